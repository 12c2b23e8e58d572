"""The prediction data plane: validate, publish one envelope, wait at the rendezvous.

Routes stay thin and call ``PredictionService.predict``; failures are typed exceptions that the
app maps to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from fastapi.exceptions import RequestValidationError

from gateway.metrics import GatewayMetrics
from gateway.validation import check_request_id, parse_body, to_matrix
from models.deployments import Deployment
from rendezvous import names
from rendezvous.appender import StreamAppender
from rendezvous.envelope import RequestEnvelope
from rendezvous.matcher import Answer, DuplicateRequest, Rendezvous

if TYPE_CHECKING:
    from gateway.drift_feed import DriftFeed

log = logging.getLogger(__name__)


class UnknownDeployment(LookupError):
    pass


class Unavailable(RuntimeError):
    """Redis cannot take the request now; the caller may retry."""


class Overloaded(RuntimeError):
    """This gateway already holds as many requests as it may (answer 429 at once)."""


class Backlogged(RuntimeError):
    """The deployment's input stream is too far behind (answer 503 at once)."""


class NoAnswer(TimeoutError):
    def __init__(self, request_id: str, answer: Answer):
        super().__init__(answer.reason)
        self.request_id = request_id
        self.answer = answer


class DeploymentCache:
    """Every deployment's state, refreshed from Redis in the background (one pipelined read
    a second), so the request path never asks Redis what a deployment looks like."""

    def __init__(self, client: aioredis.Redis):
        self.client = client
        self.deployments: dict[str, Deployment] = {}
        self.backlog: dict[str, int] = {}
        """Entries in each input stream: trimming follows the slowest consumer group, so this
        is the backlog of the slowest reader."""
        self._raw: dict[str, bytes] = {}

    async def refresh(self) -> None:
        members = sorted(m.decode() for m in await self.client.smembers(names.DEPLOYMENTS_SET))
        pipe = self.client.pipeline(transaction=False)
        for name in members:
            pipe.get(names.deployment_key(name))
            pipe.xlen(names.input_stream(name))
        replies = await pipe.execute()
        raws, lengths = replies[0::2], replies[1::2]
        self.backlog = dict(zip(members, lengths, strict=True))
        fresh: dict[str, Deployment] = {}
        for name, raw in zip(members, raws, strict=True):
            if raw is None:
                continue
            if self._raw.get(name) == raw:
                fresh[name] = self.deployments[name]
                continue
            try:
                fresh[name] = Deployment.from_json(raw)
                self._raw[name] = raw
            except (ValueError, KeyError) as exc:
                log.error("deployment %s has an unreadable state: %s", name, exc)
        self.deployments = fresh

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except redis.RedisError as exc:
                log.warning("cannot refresh deployments: %s", exc)

    def get(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            raise UnknownDeployment(f"deployment {name!r} does not exist")
        return dep


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
        metrics: GatewayMetrics | None = None,
        drift_feed: DriftFeed | None = None,
    ):
        self.metrics = metrics or GatewayMetrics()
        self.drift_feed = drift_feed
        self.deployments = deployments
        self.rendezvous = rendezvous
        self.appender = appender
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.max_backlog = max_backlog
        self.in_flight = 0
        self.metrics.track_in_flight(lambda: self.in_flight)

    async def predict(self, deployment: str, raw: bytes, request_id: str | None) -> dict[str, Any]:
        """Validate, publish, wait; refuses at once when this gateway or the stream is full.
        Every request is counted once, by outcome (see ``gateway.metrics.OUTCOMES``)."""
        t0 = time.perf_counter()
        known = deployment if deployment in self.deployments.deployments else None
        try:
            response, outcome = await self._predict(deployment, raw, request_id, t0)
        except NoAnswer:
            self.metrics.request_done(known, "timeout", time.perf_counter() - t0)
            raise
        except (RequestValidationError, UnknownDeployment, DuplicateRequest):
            self.metrics.request_done(known, "invalid", None)
            raise
        except (Overloaded, Backlogged):
            self.metrics.request_done(known, "rejected", None)
            raise
        except BaseException:
            self.metrics.request_done(known, "error", None)
            raise
        self.metrics.request_done(known, outcome, time.perf_counter() - t0)
        return response

    async def _predict(
        self, deployment: str, raw: bytes, request_id: str | None, t0: float
    ) -> tuple[dict[str, Any], str]:
        dep = self.deployments.get(deployment)
        spec = dep.feature_spec
        features = to_matrix(spec, parse_body(raw), self.max_rows)
        rid = check_request_id(request_id) if request_id else os.urandom(16).hex()
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(f"this gateway already holds {self.in_flight} requests; retry later")
        backlog = self.deployments.backlog.get(dep.name, 0)
        if backlog >= self.max_backlog:
            raise Backlogged(
                f"deployment {dep.name} has {backlog} entries not yet consumed by every reader"
            )
        self.in_flight += 1
        try:
            return await self._publish_and_wait(dep, rid, raw, features, t0)
        finally:
            self.in_flight -= 1

    async def _publish_and_wait(
        self, dep: Deployment, rid: str, raw: bytes, features: Any, t0: float
    ) -> tuple[dict[str, Any], str]:
        spec = dep.feature_spec
        schedule = dep.schedule.for_request(rid)  # the A/B split draw, if any
        mailbox = self.rendezvous.open(rid, dep.name, schedule, dep.role_names)
        envelope = RequestEnvelope(
            request_id=rid,
            deployment=dep.name,
            reply_to=self.rendezvous.reply_to,
            deadline_ms=int(mailbox.started_ms + schedule.timeout_ms),
            enqueued_ms=time.time() * 1000,
            raw=raw,
            features=features,
            spec_version=spec.version,
        )

        def unpublished(exc: Exception) -> None:
            self.rendezvous.fail(mailbox, Unavailable(f"the request bus is unavailable: {exc}"))

        # Not awaited on its own: the one wait below ends with the answer, or with this
        # error if the XADD failed (one suspension per request instead of two).
        self.appender.append_nowait(
            names.input_stream(dep.name), envelope.encode(), on_error=unpublished
        )
        if self.drift_feed is not None:
            self.drift_feed.observe_rows(dep.name, features)
        answer = await self.rendezvous.wait(mailbox)
        if answer.result is None:
            raise NoAnswer(rid, answer)
        result = answer.result
        proba = result.probabilities.tolist()
        classes = [str(c) for c in result.classes]
        return {
            "request_id": rid,
            "model": {"name": result.model, "version": result.version, "role": answer.role},
            "predictions": [
                {"label": label, "probabilities": dict(zip(classes, row, strict=True))}
                for label, row in zip(result.labels, proba, strict=True)
            ],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }, answer.outcome


__all__ = [
    "Backlogged",
    "DeploymentCache",
    "DuplicateRequest",
    "NoAnswer",
    "Overloaded",
    "PredictionService",
    "Unavailable",
    "UnknownDeployment",
]
