"""One role of a deployment as a model worker serves it: the model version that holds the
role, its consumer in the role's group, its counters, and how it scores a batch.

A worker serves one role, or (a worker host's shadow roles of one deployment) several over the
same input: each role keeps its own group, consumer, model and counters, so readiness, the
admin API and ``/metrics`` see each role as before, while the batch is read, decoded and
answered once for all of them (``models.worker``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from models.deployments import Deployment, DeploymentNotFound, ModelRef
from models.memory_bound import rebound
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier, RunLimit, RunStopped
from rendezvous import names
from rendezvous.bus.group_reads import Membership
from rendezvous.bus.routing import Command, command
from rendezvous.envelope import ModelResult, RequestEnvelope
from rendezvous.input_types import unfit
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


Scored = tuple[str, ModelResult]
"""(the gateway's reply stream, the result it is owed)."""


FORGET_WORKERS_S = 600.0
"""A worker whose last heartbeat is this old leaves the deployment's worker set (the scrape
drops its counters from the stats hash after as long)."""


class RoleModel:
    def __init__(
        self, registry: ModelRegistry, deployment: str, role: str, consumer: str,
        shadow_batch_wait_ms: float = SHADOW_BATCH_WAIT_MS, run_limit: RunLimit | None = None,
    ):  # fmt: skip
        self.registry = registry
        self.run_limit = run_limit
        """Stops a model run past its bound (``RDV_MODEL_RUN_LIMIT_S``); None: unbounded."""
        self.deployment = deployment
        self.role = names.check_role(role)
        self.member = Membership(names.model_group(role), consumer)
        self.shadow_batch_wait_ms = shadow_batch_wait_ms
        self.batch_wait_s = 0.0
        """This role's wait after a short read (``batch_wait_s``); 0 until it follows its
        deployment."""
        self.stats = WorkerStats()
        self.model: OnnxClassifier | None = None
        self.model_ref: ModelRef | None = None

    @property
    def consumer(self) -> str:
        return self.member.consumer

    # -- following the deployment -----------------------------------------------------------

    def follow(self, dep: Deployment) -> None:
        """Serve what holds this role in ``dep``; raises ``DeploymentNotFound`` when the role
        is not in it."""
        self.batch_wait_s = batch_wait_s(self.role, dep.schedule, self.shadow_batch_wait_ms)
        ref = dep.roles.get(self.role)
        if ref is None:
            raise DeploymentNotFound(f"deployment {self.deployment} has no role {self.role}")
        if ref == self.model_ref:
            return
        meta = self.registry.meta(ref.name, ref.version)
        self.model = OnnxClassifier(self.registry.artifact(ref.name, ref.version, meta), meta)
        rebound()  # the model's weights are held for good: a run's headroom is beyond them
        if self.model_ref is not None:
            self.stats.reloads += 1
        log.info("%s/%s now serves %s", self.deployment, self.role, ref)
        self.model_ref = ref

    # -- heartbeat ----------------------------------------------------------------------------

    def stats_json(self, now_s: float) -> str:
        """The counters as published: with the time and the model version that serves now."""
        ref = self.model_ref
        name, version = (ref.name, ref.version) if ref else (None, None)
        stats = dataclasses.asdict(self.stats)
        return json.dumps({"ts": now_s, "model": name, "version": version, **stats})

    def heartbeat(self, beat: float) -> list[Command]:
        """Liveness (readiness reads it) and counters (``/metrics`` reads them)."""
        member = names.worker_member(self.role, self.consumer).encode()
        workers = names.workers_key(self.deployment).encode()
        stats = names.stats_key(self.deployment).encode()
        gone = repr(beat - FORGET_WORKERS_S).encode()
        return [
            command(b"ZADD", workers, repr(beat).encode(), member),
            # Workers silent this long are gone (a restart under a new name, a role removed):
            # without this their members stayed for good, one more every restart.
            command(b"ZREMRANGEBYSCORE", workers, b"-inf", b"(" + gone),
            command(b"HSET", stats, member, self.stats_json(beat).encode()),
        ]

    # -- scoring ------------------------------------------------------------------------------

    def score(self, live: list[tuple[RequestEnvelope, float]], quiet: bool = False) -> list[Scored]:
        """One onnxruntime call for every row of every request in the batch (``quiet``: a
        failure is not logged, its caller says it)."""
        model, ref = self.model, self.model_ref
        assert model is not None and ref is not None
        width = model.meta.feature_spec.width
        good = [(env, q) for env, q in live if env.features.shape[1] == width]
        out = [self._failed(env, q, f"expected {width} features per row")
               for env, q in live if env.features.shape[1] != width]  # fmt: skip
        if model.input_dtype.kind == "i":  # never for a float model: its path stays as it was
            fits = [(env, q, unfit(env.features, model.input_dtype)) for env, q in good]
            out += [self._failed(env, q, f"input unfit for the model: {why}")
                    for env, q, why in fits if why is not None]  # fmt: skip
            good = [(env, q) for env, q, why in fits if why is None]
        if not good:
            return out
        x = (
            np.concatenate([env.features for env, _ in good])
            if len(good) > 1
            else good[0][0].features
        )
        t0 = time.perf_counter()
        try:
            labels, proba = model.predict(x, self.run_limit)
        except Exception as exc:  # a model that fails must not take the worker down
            if len(good) > 1 and not isinstance(exc, RunStopped):
                return out + self._alone(good, exc)
            self.stats.errors += len(good)
            if not quiet:
                log.exception("model %s failed on a batch of %d rows", ref, len(x))
            return out + [self._failed(env, q, f"model failed: {exc}") for env, q in good]
        inference_s = time.perf_counter() - t0
        ms_per_row = inference_s * 1000 / len(x)
        self.stats.inference_s += inference_s
        self.stats.rows += len(x)
        finite = np.isfinite(proba).all(axis=1) if proba.ndim == 2 else np.ones(len(x), bool)
        row = 0
        for env, queue_ms in good:
            n = env.features.shape[0]
            if not finite[row : row + n].all():
                # Inputs far outside training (say 3e38, finite in float32) can overflow a
                # scaler or a softmax: this model has no answer for the request, and the
                # schedule's fallback (the canary, often finite) answers instead of a 502.
                bad = int(np.flatnonzero(~finite[row : row + n])[0])
                self.stats.errors += 1
                why = f"model answered a non-finite probability (row {bad})"
                out.append(self._failed(env, queue_ms, why))
                row += n
                continue
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
            self.stats.scored += 1
        return out

    def _alone(self, batch: list[tuple[RequestEnvelope, float]], exc: Exception) -> list[Scored]:
        """Each request of a failed batch scored on its own: one request's rows can fail a
        model (memory it is refused, a value it chokes on) and failed every other request read
        with it. Not after a run stopped past its time limit: each would take as long again."""
        out = [scored for item in batch for scored in self.score([item], quiet=True)]
        failed = sum(1 for _, result in out if result.error is not None)
        log.warning("model %s failed on a batch of %d requests (%s); alone, %d of them failed",
                    self.model_ref, len(batch), exc, failed)  # fmt: skip
        return out

    def _failed(self, env: RequestEnvelope, queue_ms: float, error: str) -> Scored:
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
