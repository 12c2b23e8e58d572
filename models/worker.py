"""The model worker: one process serving one role of one deployment.

It reads a batch of envelopes per XREADGROUP, runs onnxruntime once for the whole batch, and
writes every result to its request's reply stream together with the acks in one pipelined
round trip. Entries past their deadline are acked and counted, never scored late.

Only real (and a challenger with an A/B split) answers callers. Every other role (the canary,
shadow challengers) only has to reach the decision record within the grace period, so after a
short read it waits a few milliseconds before reading again: at moderate load one wake-up,
one onnxruntime call and one write round trip then serve many requests instead of one each,
and the CPU they would burn stays with the critical path.

The reading (own pending entries first, XAUTOCLAIM of a dead worker's, backoff, stop) is the
shared ``ConsumerLoop``; a worker adds the model, its write round trip (results, acks and
heartbeat together) and the deployment's revision, read in the same round trip as each batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import redis

from models.deployment_store import DeploymentStore, ensure_groups
from models.deployments import Deployment, DeploymentNotFound, ModelRef
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from rendezvous import names
from rendezvous.bus.aside import UNREACHABLE
from rendezvous.bus.connection import REDIS_FAILURES, Client
from rendezvous.bus.consumer import Batch, ConsumerLoop, Entry
from rendezvous.bus.routing import command, raise_first_error
from rendezvous.envelope import EnvelopeError, ModelResult, RequestEnvelope, encode_results
from rendezvous.schedule import Schedule

log = logging.getLogger(__name__)

SHADOW_BATCH_WAIT_MS = 15.0
"""Default wait of a role that never answers first, after a read that did not fill a batch."""


def batch_wait_s(role: str, schedule: Schedule, shadow_batch_wait_ms: float) -> float:
    """How long a worker of ``role`` waits after a short read before it reads again.

    Real and split challengers answer callers: no wait, ever. Any other role waits at most
    ``shadow_batch_wait_ms``, and never more than a quarter of the grace period, so its result
    still lands in the decision record with a wide margin (15 ms against the default 200 ms);
    a fallback role also at most a third of ``real_deadline_ms`` (16.7 ms by default), so it
    has answered by the time real is late and the fallback is needed.
    """
    if role == names.REAL or role in schedule.split_roles:
        return 0.0
    wait_ms = min(shadow_batch_wait_ms, schedule.grace_ms / 4)
    if role in schedule.fallbacks:
        wait_ms = min(wait_ms, schedule.real_deadline_ms / 3)
    return max(wait_ms, 0.0) / 1000


@dataclass
class WorkerStats:
    """Counters since the process started; published to ``stats_key`` with each heartbeat,
    since a worker has no HTTP port of its own for ``/metrics``."""

    scored: int = 0
    """Requests scored (a request may carry several rows)."""
    rows: int = 0
    """Rows scored: what onnxruntime actually worked on."""
    inference_s: float = 0.0
    """Seconds spent inside onnxruntime, so a scrape can tell model time from overhead."""
    batches: int = 0
    expired: int = 0
    malformed: int = 0
    errors: int = 0
    reclaimed: int = 0
    reloads: int = 0


class ModelWorker(ConsumerLoop):
    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        *,
        deployment: str,
        role: str,
        consumer: str,
        batch_size: int = 64,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        reply_maxlen: int = 10_000,
        heartbeat_s: float = 1.0,
        shadow_batch_wait_ms: float = SHADOW_BATCH_WAIT_MS,
    ):
        self.deployment = names.check_name(deployment, "deployment")
        self.role = names.check_role(role)
        self.stream = names.input_stream(deployment)
        # Both round trips of a batch go through the loop's router (see
        # ``rendezvous.bus.blocking_router``): redis-py's command layer cost more than the model.
        super().__init__(
            client,
            group=names.model_group(role),
            consumer=consumer,
            batch_size=batch_size,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            heartbeat_s=heartbeat_s,
            read_along=[command(b"GET", names.revision_key(self.deployment).encode())],
        )
        self.registry = registry
        self.store = DeploymentStore(client)
        self.reply_maxlen = reply_maxlen
        self.shadow_batch_wait_ms = shadow_batch_wait_ms
        self.batch_wait_s = 0.0
        """This role's wait after a short read (``batch_wait_s``), from the deployment's
        schedule; 0 until the deployment is read."""
        self.stats = WorkerStats()
        self.model: OnnxClassifier | None = None
        self.model_ref: ModelRef | None = None
        self.revision = 0
        self._streams: tuple[str, ...] = (self.stream,)

    # -- model --------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model version that holds this worker's role now."""
        dep = self.store.get(self.deployment)
        self._follow_schedule(dep.schedule)
        self._follow_partitions(dep)
        self._follow(dep.revision, dep.roles.get(self.role))

    def _follow_partitions(self, dep: Deployment) -> None:
        """Read every input partition of ``dep``, making sure their groups exist (a change of
        the partition count cut short is finished here)."""
        streams = tuple(dep.input_streams)
        if streams != self._streams:
            if len(streams) > 1:
                ensure_groups(self.client, dep)
            self._streams = streams

    def _follow_schedule(self, schedule: Schedule) -> None:
        self.batch_wait_s = batch_wait_s(self.role, schedule, self.shadow_batch_wait_ms)

    def _follow(self, revision: int, ref: ModelRef | None) -> None:
        self.revision = revision
        if ref is None:
            raise DeploymentNotFound(f"deployment {self.deployment} has no role {self.role}")
        if ref == self.model_ref:
            return
        meta = self.registry.meta(ref.name, ref.version)
        self.model = OnnxClassifier(self.registry.artifact_path(ref.name, ref.version), meta)
        if self.model_ref is not None:
            self.stats.reloads += 1
        log.info("%s/%s now serves %s", self.deployment, self.role, ref)
        self.model_ref = ref

    # -- the consumer loop's hooks ---------------------------------------------------------------

    def streams_to_read(self) -> tuple[str, ...]:
        if self.model is None:  # the model before the first read
            self.load()
        return self._streams

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        # A role removed from the deployment takes its consumer group with it.
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc) and self._role_gone():
            log.info("%s/%s: the role is gone; stopping", self.deployment, self.role)
            return False
        retry = super().failed(exc, retry_in_s)
        self.stats.errors += 1  # rdv_worker_errors_total: Redis down or full, counted
        return retry

    def close(self) -> None:
        """A clean stop removes this worker's published counters, so they vanish from
        ``/metrics`` at once (a killed worker's entry only goes stale)."""
        self.unpublish()
        super().close()

    def process(self, batch: Batch) -> int:
        """One onnxruntime call, one write round trip. Returns entries handled."""
        self.stats.reclaimed += batch.claimed
        # The revision rode along with the read (same round trip), so a batch is scored by
        # the version holding the role when it was read: a promotion takes effect at once,
        # not at the next heartbeat.
        revision = batch.along[0] if batch.along else None
        if revision is not None and int(revision) != self.revision:
            self._maybe_reload(self.client.get(names.deployment_key(self.deployment)))
        now = self.heartbeat_due()
        if not batch.entries and now is None:
            return 0
        return self._handle(batch.entries, now)

    def unpublish(self) -> None:
        """Remove this worker's counters from the stats hash (best effort: Redis may be down)."""
        member = names.worker_member(self.role, self.consumer)
        try:
            self.client.hdel(names.stats_key(self.deployment), member)
        except REDIS_FAILURES as exc:
            log.warning("could not remove the stats of %s: %s", member, exc)

    def stats_json(self, now_s: float) -> str:
        """The counters as published: with the time and the model version that serves now."""
        ref = self.model_ref
        name, version = (ref.name, ref.version) if ref else (None, None)
        stats = dataclasses.asdict(self.stats)
        return json.dumps({"ts": now_s, "model": name, "version": version, **stats})

    def _role_gone(self) -> bool:
        try:
            return self.role not in self.store.get(self.deployment).roles
        except DeploymentNotFound:
            return True

    def _handle(self, entries: list[Entry], beat: float | None) -> int:
        """Score, then results, acks and (``beat``: its time, when due) the heartbeat in one
        round trip."""
        now_ms = time.time() * 1000
        ack_ids: dict[str, list[bytes]] = {}
        live: list[tuple[RequestEnvelope, float]] = []
        replies: list[tuple[str, ModelResult]] = []
        for stream_key, entry_id, fields in entries:
            ack_ids.setdefault(stream_key, []).append(entry_id)
            if not fields:  # pending, but trimmed from the stream since: just let it go
                continue
            try:
                env = RequestEnvelope.decode(fields)
            except EnvelopeError as exc:
                self.stats.malformed += 1
                log.warning("skipping malformed entry %s: %s", entry_id, exc)
                continue
            if env.deadline_ms < now_ms:
                self.stats.expired += 1
                continue
            live.append((env, now_ms - env.enqueued_ms))
        if live:
            replies.extend(self._score(live))
        if entries:
            self.stats.batches += 1
        by_gateway: dict[str, list[ModelResult]] = {}
        for reply_to, result in replies:
            by_gateway.setdefault(reply_to, []).append(result)
        commands = []
        for reply_to, results in by_gateway.items():
            # One entry per gateway for the whole batch, so the cap, which counts results,
            # becomes entries of this batch's size. NOMKSTREAM: a gateway that is gone has no
            # stream, and we must not recreate it.
            ((field, value),) = encode_results(results).items()
            maxlen = b"%d" % max(1, self.reply_maxlen // len(results))
            commands.append(command(b"XADD", reply_to.encode(), b"NOMKSTREAM", b"MAXLEN", b"~",
                                    maxlen, b"*", field, value))  # fmt: skip
        for stream, ids in ack_ids.items():  # each on its partition's node
            commands.append(command(b"XACK", stream.encode(), self._group_b, *ids))
        essential = len(commands)
        if beat is not None:
            # The heartbeat rides with the results: liveness and counters cost no round trip
            # of their own (the deployment's revision came with the read).
            member = names.worker_member(self.role, self.consumer).encode()
            workers = names.workers_key(self.deployment).encode()
            stats = names.stats_key(self.deployment).encode()
            commands += [
                command(b"ZADD", workers, repr(beat).encode(), member),
                command(b"HSET", stats, member, self.stats_json(beat).encode()),
            ]
        # On a cluster the results go to each gateway's node, the acks to each partition's and
        # the heartbeat to the deployment's, in one round trip per node, all written before any
        # reply is read. A heartbeat whose node is away (partition 0's master failing over)
        # must not hold up the other partitions: it is sent again when next due.
        replies = self.bus.execute(commands)
        raise_first_error(replies[:essential])
        raise_first_error([r for r in replies[essential:] if not isinstance(r, UNREACHABLE)])
        return len(entries)

    def _score(self, live: list[tuple[RequestEnvelope, float]]) -> list[tuple[str, ModelResult]]:
        """One onnxruntime call for every row of every request in the batch."""
        model, ref = self.model, self.model_ref
        assert model is not None and ref is not None
        width = model.meta.feature_spec.width
        good = [(env, q) for env, q in live if env.features.shape[1] == width]
        out = [self._failed(env, q, f"expected {width} features per row")
               for env, q in live if env.features.shape[1] != width]  # fmt: skip
        if not good:
            return out
        x = (
            np.concatenate([env.features for env, _ in good])
            if len(good) > 1
            else good[0][0].features
        )
        t0 = time.perf_counter()
        try:
            labels, proba = model.predict(x)
        except Exception as exc:  # a model that fails must not take the worker down
            self.stats.errors += len(good)
            log.exception("model %s failed on a batch of %d rows", ref, len(x))
            return out + [self._failed(env, q, f"model failed: {exc}") for env, q in good]
        inference_s = time.perf_counter() - t0
        ms_per_row = inference_s * 1000 / len(x)
        self.stats.inference_s += inference_s
        self.stats.rows += len(x)
        row = 0
        for env, queue_ms in good:
            n = env.features.shape[0]
            out.append(
                (
                    env.reply_to,
                    self._result(
                        env, queue_ms, labels[row : row + n].tolist(), proba[row : row + n],
                        ms_per_row * n,  # its rows' share of the batch's one call
                    ),
                )
            )  # fmt: skip
            row += n
        self.stats.scored += len(good)
        return out

    def _failed(self, env: RequestEnvelope, queue_ms: float, error: str) -> tuple[str, ModelResult]:
        empty = np.zeros((0, 0), np.float32)
        return env.reply_to, self._result(env, queue_ms, [], empty, 0.0, error=error)

    def _result(
        self, env: RequestEnvelope, queue_ms: float, labels: list[int], proba: np.ndarray,
        latency_ms: float, error: str | None = None,
    ) -> ModelResult:  # fmt: skip
        assert self.model is not None
        return ModelResult(
            request_id=env.request_id,
            deployment=env.deployment,
            model=self.model.name,
            version=self.model.version,
            role=self.role,
            labels=labels,
            probabilities=proba,
            classes=self.model.meta.classes,
            model_latency_ms=latency_ms,
            queue_ms=queue_ms,
            error=error,
        )

    def _maybe_reload(self, raw: bytes | str | None) -> None:
        """Follow a deployment change whose revision came with a read (hot swap)."""
        if raw is None:
            return
        dep = Deployment.from_json(raw)
        if dep.revision == self.revision:
            return
        self._follow_schedule(dep.schedule)
        self._follow_partitions(dep)
        ref = dep.roles.get(self.role)
        if ref is None:
            log.warning("role %s was removed from %s; keeping %s until stopped", self.role,
                        self.deployment, self.model_ref)  # fmt: skip
            self.revision = dep.revision
            return
        try:
            self._follow(dep.revision, ref)
        except Exception:
            log.exception("cannot load %s for %s/%s; keeping %s", ref, self.deployment,
                          self.role, self.model_ref)  # fmt: skip
            self.revision = dep.revision
