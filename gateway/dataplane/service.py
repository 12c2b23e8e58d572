"""The prediction data plane: validate, publish one envelope, wait at the rendezvous.

``PredictionService.predict`` is the one call every transport makes (``gateway.transport``);
failures are the typed exceptions of ``gateway.dataplane.failures``, which the transport maps
to HTTP answers. What the service reports (request outcomes, feature rows) goes to observers
given to it, so the data plane imports nothing of observability.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError

from gateway.dataplane.answers import pinned_role, predictions
from gateway.dataplane.backlog_bound import BacklogBound
from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.entity_features import read_entities
from gateway.dataplane.failures import (
    Backlogged,
    DuplicateRequest,
    NoAnswer,
    Overloaded,
    Unavailable,
    UnknownDeployment,
    passing,
)
from gateway.dataplane.mailbox import Mailbox
from gateway.dataplane.matcher import Rendezvous
from gateway.dataplane.no_answer import raise_if_redis_failed, unreplicated
from gateway.dataplane.observers import NoTally, RequestTally, RowSink
from gateway.dataplane.realtime_first import RealtimeFirst
from gateway.dataplane.validation import (
    check_matrix,
    check_request_id,
    enriched_rows,
    merged,
    parse_body,
    to_matrix,
)
from models.deployments import Deployment
from rendezvous import names
from rendezvous.bus.appender import (
    AlreadyTaken,
    NotReplicated,
    StreamAppender,
    StreamGone,
)
from rendezvous.bus.async_router import Router
from rendezvous.bus.failures import REDIS_FAILURES, refused_for_a_while, said
from rendezvous.envelope import SENT_FIELD, RequestEnvelope
from rendezvous.input_types import FLOAT32
from rendezvous.ood import OodReference
from rendezvous.request_ids import new_request_id
from rendezvous.retry_log import RetryLog
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

Decoder = Callable[[FeatureSpec, bytes], tuple[np.ndarray, list[str] | None]]
"""A protocol's reading of a body: the feature matrix and None, or, for a deployment that looks
features up, the caller's part (``spec.caller_names`` wide) and each row's entity."""
"""A protocol's body -> the float32 matrix (rows x the spec's width), or RequestValidationError."""


class PredictionService:
    def __init__(
        self,
        deployments: DeploymentCache,
        rendezvous: Rendezvous,
        appender: StreamAppender,
        *,
        max_rows: int,
        max_in_flight: int,
        max_backlog: int,
        max_backlog_bytes: int = 2**62,
        request_id_ttl_s: int = 3600,
        metrics: RequestTally | None = None,
        drift_feed: RowSink | None = None,
        feature_store: Router | None = None,
        realtime_first: RealtimeFirst | None = None,
    ):
        """``feature_store``: the router to the Redis that holds the entity features of
        deployments that look some up (``FeatureSpec.lookup``); only their requests use it.
        The hot path's router, not redis-py's command layer: a lost node fails the lookup in
        a quarter of a second as it fails an append (redis-py's cluster retries held enriched
        requests 3-4 s through a failover)."""
        self.feature_store = feature_store
        self.metrics = metrics or NoTally()
        self.held_changed: Callable[[], None] = self.metrics.held_changed
        """Called as ``held`` moves (a request in or out, a body starting or done): the
        in-flight gauge is written soon after, not only when some request ends or this very
        process is scraped (another process's scrape read its stale value: 0 while it held
        its bound of stalled uploads, or 3 for good after they went)."""
        self.drift_feed = drift_feed
        self.deployments = deployments
        self.rendezvous = rendezvous
        self.appender = appender
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.backlog = BacklogBound(deployments, max_backlog, max_backlog_bytes)
        self._earlier_ids_log = RetryLog(log, "caller ids under earlier partition counts")
        self.request_id_ttl_ms = request_id_ttl_s * 1000
        self.in_flight = 0
        self.reading = 0
        """Requests whose body is still arriving (``reading_body``): held from their head, so
        counted against ``max_in_flight`` (120 stalled uploads of 1 MB held 200 MB of a gateway
        with no 429 and ``rdv_in_flight_requests`` at 0; a helper's probe)."""
        self.realtime_first = realtime_first or RealtimeFirst()
        """Counts the realtime predicts in flight; a job's long steps take their turns."""
        self._ood: dict[int, tuple[FeatureSpec, OodReference | None]] = {}

    async def predict(
        self,
        deployment: str,
        raw: bytes,
        request_id: str | None,
        decode: Decoder | None = None,
        version: str | None = None,
        patience_ms: float = 0.0,
        job: str = "",
    ) -> dict[str, Any]:
        """Validate, publish, wait; refuses at once when this gateway or the stream is full.
        Every request is counted once, by outcome (see
        ``gateway.observability.metrics.OUTCOMES``).

        ``decode`` turns the body into the model-ready float32 matrix, in the deployment's
        feature-spec order, raising ``RequestValidationError`` for what is wrong; the default
        reads this gateway's own JSON (``features`` or ``instances``). Other protocols bring
        their own decoder and travel the same path: the envelope carries ``raw`` as sent, so
        the archive holds it.

        ``version``: only the role that model version holds answers (an Open Inference
        Protocol versioned infer), real first where it holds several; 404 if none.

        ``patience_ms``: wait this long for an answer where the deployment's ``timeout_ms``
        is shorter (an async job's predict; ``Schedule.patient``). ``job``: the async job
        this predict runs, whose earlier tries may hold its request id (not a duplicate)."""
        t0 = time.perf_counter()
        known = deployment if deployment in self.deployments.deployments else None
        # A job's run: its wait is no caller's latency, and a try refused for a moment is
        # tried again, so only its end counts (each try was a "rejected" no caller saw).
        timed = None if job else t0
        try:
            response, outcome = await self._predict(deployment, raw, request_id, t0, decode,
                                                    version, patience_ms, job)  # fmt: skip
        except NoAnswer as exc:
            outcome = "error" if exc.answer.failed else "timeout"
            self.metrics.request_done(known, outcome, _since(timed))
            raise
        except (RequestValidationError, UnknownDeployment, DuplicateRequest):
            self.metrics.request_done(known, "invalid", None)
            raise
        except (Overloaded, Backlogged):
            if not job:
                self.metrics.request_done(known, "rejected", None)
            raise
        except BaseException as exc:
            if not (job and (passing(exc) or isinstance(exc, asyncio.CancelledError))):
                self.metrics.request_done(known, "error", None)
            raise
        self.metrics.request_done(known, outcome, _since(timed))
        return response

    async def _predict(
        self,
        deployment: str,
        raw: bytes,
        request_id: str | None,
        t0: float,
        decode: Decoder | None,
        version: str | None = None,
        patience_ms: float = 0.0,
        job: str = "",
    ) -> tuple[dict[str, Any], str]:
        dep = self.deployments.get(deployment)
        pin = pinned_role(dep, version) if version is not None else None
        spec = dep.feature_spec
        rule = dep.input_rule
        entities: list[str] | None = None
        if job:
            await self.realtime_first.turn()  # the body's check: milliseconds for 1,000 rows
        if decode is None:
            body = parse_body(raw, spec, self.max_rows)
            if spec.lookup is None:
                features = to_matrix(spec, body, self.max_rows, rule)
            else:  # enrichment: the caller's part now, the feature store's below
                features, entities = enriched_rows(spec, body, self.max_rows, rule)
        else:  # a protocol's own decoder: the matrix, or the caller's part and the entities
            x, entities = decode(spec, raw)
            columns = spec.names if entities is None else spec.caller_names
            features = check_matrix(spec, x, self.max_rows, columns, rule)
        rid = check_request_id(request_id) if request_id else new_request_id()
        self.check_room(dep.name)
        self.in_flight += 1
        self.held_changed()
        if not job:
            self.realtime_first.started()
        try:
            looked_up = None
            if entities is not None:
                features, looked_up = await self._enrich(dep, features, entities)
            return await self._publish_and_wait(
                dep, rid, raw, features, t0, bool(request_id), looked_up, decode is None, pin,
                patience_ms, job,
            )  # fmt: skip
        finally:
            self.in_flight -= 1
            self.held_changed()
            if not job:
                self.realtime_first.ended()

    async def _enrich(
        self, dep: Deployment, caller: np.ndarray, entities: list[str]
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The model's input with the entities' stored features merged in (one round trip),
        and what was looked up; a 422 naming an entity the store cannot fill."""
        lookup = dep.feature_spec.lookup
        assert lookup is not None
        if self.feature_store is None:
            raise Unavailable("this gateway has no feature store to look entities up in")
        try:  # never longer than the request may take
            stored = await read_entities(
                self.feature_store, dep.name, lookup, entities, dep.schedule.timeout_ms / 1000
            )
        except REDIS_FAILURES as exc:
            raise Unavailable(f"the feature store is unavailable: {exc}") from exc
        return merged(dep.feature_spec, caller, entities, stored, dep.input_rule)

    def ood_reference(self, spec: FeatureSpec) -> OodReference | None:
        """The spec's training statistics as the OOD score reads them, built once per spec
        (the deployment cache keeps a spec's object while it is unchanged)."""
        cached = self._ood.get(id(spec))
        if cached is not None and cached[0] is spec:
            return cached[1]
        if len(self._ood) > 64:  # specs replaced over a long life: forget the old ones
            self._ood.clear()
        reference = OodReference.from_spec(spec)
        self._ood[id(spec)] = (spec, reference)
        return reference

    @property
    def held(self) -> int:
        """Requests this process holds: in the service, or their body still arriving."""
        return self.in_flight + self.reading

    def full(self) -> bool:
        """At the in-flight bound: a new request is refused 429 from its head."""
        return self.held >= self.max_in_flight

    @contextlib.contextmanager
    def reading_body(self) -> Iterator[None]:
        """Count a request while its body arrives (``full`` is checked at its head)."""
        self.reading += 1
        self.held_changed()
        try:
            yield
        finally:
            self.reading -= 1
            self.held_changed()

    def check_room(self, deployment: str) -> None:
        """Refuse at once when this gateway holds as many requests as it may (429) or the
        deployment's input holds too much unconsumed (503): predicts and job submissions."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(f"this gateway already holds {self.in_flight} requests; retry later")
        self.backlog.check(deployment)

    async def _publish_and_wait(
        self,
        dep: Deployment,
        rid: str,
        raw: bytes,
        features: Any,
        t0: float,
        chosen: bool,
        looked_up: list[dict[str, Any]] | None = None,
        raw_is_json: bool = False,
        pin: str | None = None,
        patience_ms: float = 0.0,
        job: str = "",
    ) -> tuple[dict[str, Any], str]:
        """``chosen``: the caller chose the request id, which must then be new everywhere;
        ``raw_is_json``: this gateway's JSON parser accepted ``raw`` (the archive trusts it);
        ``pin``: the role that alone may answer."""
        if chosen and (earlier := dep.earlier_id_keys(rid, time.time() * 1000
                                                      - self.request_id_ttl_ms)):  # fmt: skip
            await self._not_taken_before(rid, dep.name, earlier, job)
        spec = dep.feature_spec
        # The A/B split draw, if any; or the role the caller named by its model version.
        schedule = dep.schedule.pinned_to(pin) if pin else dep.schedule.for_request(rid)
        if patience_ms:
            schedule = schedule.patient(patience_ms)
        mailbox = self.rendezvous.open(rid, dep.name, schedule, dep.role_names)
        mailbox.features, mailbox.ood_reference = features, self.ood_reference(spec)
        mailbox.background = bool(job)
        envelope = RequestEnvelope(
            request_id=rid,
            deployment=dep.name,
            reply_to=self.rendezvous.reply_to,
            deadline_ms=int(mailbox.started_ms + schedule.timeout_ms),
            enqueued_ms=time.time() * 1000,
            raw=raw,
            features=features,
            spec_version=spec.version,
            looked_up=looked_up,
            raw_is_json=raw_is_json,
            job=job,
            wire_type=FLOAT32 if (rule := dep.input_rule) is None else rule.wire_type,
        )

        def unpublished(exc: Exception) -> None:
            if isinstance(exc, AlreadyTaken):
                self.rendezvous.fail(mailbox, _used(rid, dep.name))
                return
            if isinstance(exc, StreamGone):
                why = (
                    f"deployment {dep.name}'s input stream is gone: the deployment was "
                    "deleted, or Redis lost the stream and its readers are making it again"
                )
            elif refused := refused_for_a_while(exc):
                why = refused
            else:
                why = f"the request bus is unavailable: {exc}"
            self.rendezvous.fail(mailbox, Unavailable(why))

        # Not awaited on its own: the one wait below ends with the answer, or with this
        # error if the XADD failed (one suspension per request instead of two). A caller's own
        # request id is taken in the same command, for every gateway.
        stream = dep.input_stream_for(rid)
        unique = (names.request_id_key(stream, rid), self.request_id_ttl_ms) if chosen else None
        replicated = (
            asyncio.get_running_loop().create_future() if self.appender.wait_replicas else None
        )
        self.appender.append_nowait(
            stream,
            envelope.encode(),
            on_error=unpublished,
            unique=unique,
            unique_owner=job,
            replicated=replicated,
            on_appended=partial(self._published, mailbox, dep.name, features),
            must_exist=True,
            stamp=SENT_FIELD,
        )
        answer = await self.rendezvous.wait(mailbox)
        if replicated is not None:  # RDV_WAIT_REPLICAS: answer once the input is replicated
            await asyncio.wait([replicated])  # done, failed or cancelled (its append failed)
            if replicated.cancelled():
                raise Unavailable("the request's input could not be written to Redis")
            if isinstance(replicated.exception(), NotReplicated):
                # the input is in the stream all the same: scored and archived under its id
                raise unreplicated(replicated.exception(), rid, chosen)
        if answer.result is None:
            if not answer.failed:  # the models said why: not Redis's doing
                await raise_if_redis_failed(self.rendezvous, self.appender, stream, rid,
                                            mailbox.input_id, answer.reason,
                                            mailbox.started_ms, chosen)  # fmt: skip
            raise NoAnswer(rid, answer)
        result = answer.result
        if job:
            await self.realtime_first.turn()  # the answer's rows
        return {
            "request_id": rid,
            "model": {"name": result.model, "version": result.version, "role": answer.role},
            "predictions": predictions(result.labels, result.probabilities, result.classes),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }, answer.outcome

    async def _not_taken_before(
        self, rid: str, deployment: str, keys: list[str], job: str = ""
    ) -> None:
        """A caller's id taken under a partition count the deployment had within the ids' TTL
        is taken still (``Deployment.earlier_id_keys``): one round trip before the publish,
        only for such a deployment; by ``job``'s earlier run, it is that run's own. (Two
        requests of one id at once, one on a gateway that had not seen the change yet, may
        still both pass: the change's moment, not its hour.)"""
        try:
            taken = await self.appender.any_taken(keys, owner=job)
        except REDIS_FAILURES as exc:
            # Not checked, and the request goes on: the old count's node away (a failover) made
            # every caller-id request a 503, of every partition (a cluster test).
            self._earlier_ids_log.failed(said(exc))
            return
        self._earlier_ids_log.succeeded()
        if taken:
            raise _used(rid, deployment)

    def _published(self, mailbox: Mailbox, deployment: str, features: Any, entry: bytes) -> None:
        """The request's input is in its stream: its rows count for drift from now on. Counted
        before, a request refused on its append (a 409 on a request id sent again, a 503) fed
        the drift figures all the same: 300 refused copies of one odd row raised an alert
        (found by a helper's probe)."""
        mailbox.input_id = entry
        if self.drift_feed is not None:
            self.drift_feed.observe_rows(deployment, features)


def _used(rid: str, deployment: str) -> DuplicateRequest:
    return DuplicateRequest(
        f"request id {rid!r} was already used for deployment {deployment} (in flight or "
        "answered on some gateway, or published before a Redis failure; ids stay taken for "
        "RDV_REQUEST_ID_TTL_S)"
    )


def _since(t0: float | None) -> float | None:
    return None if t0 is None else time.perf_counter() - t0


__all__ = ["Decoder", "PredictionService"]
