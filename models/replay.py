"""Replay: score a model version offline on archived requests, and say how it would have done.

The records come from the log bin's archive (``models.archive_slice``), never from the live
streams; they are scored in batches of at most ``batch_rows`` rows, one onnxruntime call a
batch, in the caller's thread (a gateway spawns a process for it: ``run_process``). Each
request's new answer is compared with the answer given then and with real's output (the decision
records while the decisions stream still holds them, else the outcome the feedback route keeps
for ``RDV_FEEDBACK_RETENTION_S``: the same answers, the same six decimals) and with its label
where one is known. After every batch the report and the runner's tallies are saved with the
position reached, so an interrupted replay resumes at the same batch boundary and ends with the
same report as one that never stopped. Figures that depend on the clock are only under
``timing`` and ``latency``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import redis

from models.archive import ArchiveReader
from models.archive_frontier import archived_until_ms, last_archived_ms
from models.archive_slice import count, positions_from, positions_json, read, resolve
from models.deployment_store import DeploymentStore
from models.deployments import DeploymentNotFound, DeploymentUnreadable
from models.labels import label_keys, labels_for, outcome_keys, outcomes_for
from models.memory_bound import rebound
from models.registry import ModelRegistry
from models.replay_given import given_of, load_given
from models.replay_report import Given, Tally, count_request, report_view
from models.replay_store import DONE, FAILED, INTERRUPTED, RUNNING, LeaseLost, ReplayStore
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.bus.failures import REDIS_DOWN, REDIS_FAILURES
from rendezvous.input_types import DTYPES, WIRE_TYPES, unfit
from rendezvous.retry_log import RetryLog

if TYPE_CHECKING:
    from models.runtime import RunLimit

log = logging.getLogger(__name__)
T = TypeVar("T")

RIDE_OUT_S = 20.0
"""How long a replay waits for a Redis that went away (a restart, a failover) before it
fails: its report cannot be saved meanwhile. Shorter than its lease (``LEASE_MS``, 30 s): a
runner that waited longer read ``interrupted`` while it waited, and a resume then started a
second runner beside it (a helper's probe)."""


class Runner:
    """Runs (or resumes) one stored replay to its end, a stop, or a failure."""

    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        reader: ArchiveReader,
        *,
        owner: str,
        pause_s: float = 0.0,
        stop: threading.Event | None = None,
        stop_after_batches: int | None = None,
        run_limit: RunLimit | None = None,
    ):
        self.client = client
        self.store = ReplayStore(client)
        self.registry = registry
        self.reader = reader
        self.owner = owner
        self.pause_s = pause_s
        """Pause between batches (leaves the CPU to live traffic)."""
        self.stop = stop or threading.Event()
        self.stop_after_batches = stop_after_batches
        """Stop after this many batches of this run, as if asked to (tests of interruption)."""
        self.run_limit = run_limit
        """``RDV_MODEL_RUN_LIMIT_S``: a model that loops on some archived request would hold
        the replay (and its slot of ``RDV_REPLAY_CONCURRENCY``) for good."""
        self._cancelled = False
        self._redis_log = RetryLog(log, "replay: Redis")
        self._follow_key = ""
        """A key of the replay's slot (its report), for ``_follow_failover``."""

    def run(self, deployment: str, replay_id: str) -> dict[str, Any]:
        self._follow_key = names.replay_key(deployment, replay_id)
        # Ridden out too: a process spawned just as its master died read the dead node,
        # died with a traceback and left its report ``interrupted`` (a helper's probe).
        stored = self._riding(lambda: self.store.stored(deployment, replay_id))
        if stored is None:
            raise LookupError(f"no replay {replay_id} of {deployment}")
        report, state = stored
        tally = Tally.from_dict(state)
        report["timing"]["runs"] = report["timing"].get("runs", 0) + 1
        try:
            report = self._run(deployment, report, tally)
        except LeaseLost as exc:
            log.warning("replay %s of %s: %s; this run stops", replay_id, deployment, exc)
            return report
        except Exception as exc:  # any failure ends in a readable report, never a silent death
            log.exception("replay %s of %s failed", replay_id, deployment)
            report = {**report_view(report, tally), "state": FAILED,
                      "reason": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
        report["timing"]["updated_ms"] = time.time() * 1000
        if report["state"] != RUNNING:
            report["timing"]["finished_ms"] = report["timing"]["updated_ms"]
        state = dataclasses.asdict(tally)
        try:
            self._riding(lambda: self.store.finish(deployment, report, state, self.owner))
        except LeaseLost as exc:
            log.warning("replay %s of %s: %s; its end is not saved", replay_id, deployment, exc)
        return report

    def _stopping(self) -> bool:
        return self._cancelled or self.stop.is_set()

    def _riding(self, call: Callable[[], T]) -> T:
        """``call`` (a read, or a write that may be made twice), made again while Redis is
        away, for up to ``RIDE_OUT_S``: a Redis restart of a few seconds killed the replay
        process, and its report read ``running`` until its lease lapsed, then
        ``interrupted``, for a person to resume (a helper's probe)."""
        give_up = time.monotonic() + RIDE_OUT_S
        pause_s = 0.25
        while True:
            try:
                done = call()
            except REDIS_DOWN as exc:
                if time.monotonic() + pause_s > give_up:
                    raise
                self._redis_log.failed(str(exc), pause_s)
                time.sleep(pause_s)
                self._follow_failover()
                pause_s = min(pause_s * 2, 5.0)
                continue
            self._redis_log.succeeded()
            return done

    def _follow_failover(self) -> None:
        """On a cluster, one plain command on the replay's slot: redis-py's cluster client
        reads the slot table again when a command fails to connect (its pipelines, which the
        checkpoints use, do not), so a master lost for good is followed to its replica (a
        helper's probe: the replay kept trying the dead node for 60 s, then failed)."""
        if isinstance(self.client, redis.RedisCluster) and self._follow_key:
            with contextlib.suppress(*REDIS_FAILURES):
                self.client.exists(self._follow_key)

    def _checkpoint(self, deployment: str, report: dict[str, Any], tally: Tally) -> None:
        report["timing"]["updated_ms"] = time.time() * 1000
        view = report_view(report, tally)
        state = dataclasses.asdict(tally)
        if self._riding(lambda: self.store.checkpoint(deployment, view, state, self.owner)):
            self._cancelled = True

    def _run(self, deployment: str, report: dict[str, Any], tally: Tally) -> dict[str, Any]:
        report.pop("reason", None)
        report["state"] = RUNNING
        if report["positions"] is None or report["progress"]["total"] is None:
            self._resolve(deployment, report, tally)
            if self._stopping():
                return self._interrupted(report, tally)
        if not report["progress"]["total"]:  # resolved empty, now or before a resume
            return {**report_view(report, tally), "state": FAILED,
                    "reason": "no archived records in the requested range"}  # fmt: skip
        positions = positions_from(report["positions"])
        report["phase"] = "scoring"
        from models.runtime import OnnxClassifier  # onnxruntime: loaded only by a runner

        ref = report["model"]
        meta = self.registry.meta(ref["name"], ref["version"])
        model = OnnxClassifier(self.registry.artifact(ref["name"], ref["version"], meta), meta)
        rebound()  # RDV_MODEL_MEMORY_MB: a batch's headroom beyond the model's weights
        given = self._riding(lambda: load_given(self.client, deployment, positions))
        keys = self._riding(lambda: (label_keys(self.client, deployment),
                                     outcome_keys(self.client, deployment)))  # fmt: skip
        batch_rows = int(report["batch_rows"])
        batch: list[dict[str, Any]] = []
        rows = 0
        runs = 0
        for record in itertools.islice(read(self.reader, deployment, positions), tally.done, None):
            batch.append(record)
            rows += len(record.get("features") or ())
            if rows < batch_rows:
                continue
            self._score(deployment, model, batch, given, keys, tally)
            batch, rows, runs = [], 0, runs + 1
            self._checkpoint(deployment, report, tally)
            if self.stop_after_batches is not None and runs >= self.stop_after_batches:
                self._cancelled = True
            if self._stopping() or (self.pause_s and self.stop.wait(self.pause_s)):
                return self._interrupted(report, tally)
        if batch:
            self._score(deployment, model, batch, given, keys, tally)
        report["phase"] = "done"
        return {**report_view(report, tally), "state": DONE}

    def _interrupted(self, report: dict[str, Any], tally: Tally) -> dict[str, Any]:
        why = (
            "asked to stop"
            if self._cancelled
            else "the gateway running it stopped or died: resume it (POST .../resume)"
        )
        return {**report_view(report, tally), "state": INTERRUPTED, "reason": why}

    def _resolve(self, deployment: str, report: dict[str, Any], tally: Tally) -> None:
        """Positions from the requested range, or the records within given positions
        counted; saved with the total before the first batch."""
        last_beat = [time.monotonic()]

        def tick() -> None:
            if time.monotonic() - last_beat[0] > 5:
                last_beat[0] = time.monotonic()
                self._checkpoint(deployment, report, tally)
            if self._stopping():
                raise _Stop

        req = report["request"]
        try:
            if report["positions"] is not None:
                positions = count(self.reader, deployment, positions_from(report["positions"]))
            else:
                to_ms = req.get("to_ms")
                if to_ms is None:  # until its creation: where the archive was complete then
                    created = report["timing"]["created_ms"]
                    to_ms = last_archived_ms(self._archived_until_ms(deployment), created)
                positions = resolve(self.reader, deployment, from_ms=req.get("from_ms"),
                                    to_ms=to_ms, last=req.get("last"), tick=tick)  # fmt: skip
        except _Stop:
            return
        report["positions"] = positions_json(positions)
        report["progress"]["total"] = sum(span.records for span in positions.values())
        self._checkpoint(deployment, report, tally)

    def _archived_until_ms(self, deployment: str) -> float | None:
        """``models.archive_frontier``: what the log bin still holds back (None: nothing, or
        a deployment whose state is gone, all of it archived before its purge)."""
        try:
            streams = DeploymentStore(self.client).get(deployment).input_streams
        except (DeploymentNotFound, DeploymentUnreadable):
            return None
        return archived_until_ms(self.client, streams)

    def _score(
        self,
        deployment: str,
        model: Any,
        batch: list[dict[str, Any]],
        given: Mapping[str, Given],
        keys: tuple[list[str], list[str]],
        tally: Tally,
    ) -> None:
        width = model.meta.feature_spec.width
        scored: list[tuple[dict[str, Any], np.ndarray]] = []
        for record in batch:
            tally.done += 1
            tally.cursor[str(record.get("stream") or names.input_stream(deployment))] = record[
                "stream_id"
            ]
            features = record.get("features")
            if not features:
                tally.skipped["undecodable"] = tally.skipped.get("undecodable", 0) + 1
                continue
            typed = record.get("features_type") in WIRE_TYPES  # exact float64 or int64 rows
            x = np.asarray(features, dtype=DTYPES[record["features_type"]] if typed else np.float32)
            if x.ndim != 2 or x.shape[1] != width:
                tally.skipped["width"] = tally.skipped.get("width", 0) + 1
                continue
            if unfit(x, model.input_dtype) is not None:  # an integer model: never truncated
                tally.skipped["unfit"] = tally.skipped.get("unfit", 0) + 1
                continue
            scored.append((record, x))
        if not scored:
            return
        started = time.perf_counter()
        try:
            labels, proba = model.predict(np.concatenate([x for _, x in scored]), self.run_limit)
        except Exception as exc:  # one request's rows can fail a model: the others are scored
            if len(scored) == 1:
                _failed(deployment, scored[0][0], exc, tally)
                return
            for one in scored:
                started = time.perf_counter()
                try:
                    labels, proba = model.predict(one[1], self.run_limit)
                except Exception as alone:
                    _failed(deployment, one[0], alone, tally)
                    continue
                self._count(deployment, [one], labels, proba, started, given, keys, tally)
            return
        self._count(deployment, scored, labels, proba, started, given, keys, tally)

    def _count(
        self,
        deployment: str,
        scored: list[tuple[dict[str, Any], np.ndarray]],
        labels: np.ndarray,
        proba: np.ndarray,
        started: float,
        given: Mapping[str, Given],
        keys: tuple[list[str], list[str]],
        tally: Tally,
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        tally.batches += 1
        tally.model_ms_sum += elapsed_ms
        tally.model_ms_max = max(tally.model_ms_max, elapsed_ms)
        ids = [str(record.get("request_id", "")) for record, _ in scored]
        known = self._riding(lambda: labels_for(self.client, deployment, ids, keys[0]))
        gone = [rid for rid in ids if rid not in given]
        kept = self._riding(lambda: outcomes_for(self.client, deployment, gone, keys[1]))
        then = {rid: given_of(outcome) for rid, outcome in kept.items()}
        at = 0
        for (_, x), rid in zip(scored, ids, strict=True):
            n = x.shape[0]
            count_request(tally, rid, labels[at : at + n], proba[at : at + n],
                          given.get(rid) or then.get(rid),
                          known.get(rid))  # fmt: skip
            at += n


def _failed(deployment: str, record: Mapping[str, Any], exc: Exception, tally: Tally) -> None:
    """A request the model failed on (memory refused past ``RDV_MODEL_MEMORY_MB``, a value
    it chokes on): skipped as ``model_failed``, as the live worker answers it with a failure."""
    tally.skipped["model_failed"] = tally.skipped.get("model_failed", 0) + 1
    log.warning("replay of %s: the model failed on request %s: %s", deployment,
                record.get("request_id"), exc)  # fmt: skip


class _Stop(Exception):
    """Raised from a resolution's tick to stop it."""


def _stop_when_orphaned(stop: threading.Event, every_s: float = 0.5) -> None:
    """Stop after the batch once the gateway that spawned this process is gone (killed: it
    could not say so). An orphaned replay ran on unseen, outside the concurrency bound of any
    gateway; stopped, it is interrupted and resumable anywhere."""
    import os

    parent = os.getppid()
    while not stop.wait(every_s):
        if os.getppid() != parent:
            log.warning("the gateway that started this replay is gone; stopping after the batch")
            stop.set()


def run_process(
    redis_url: str,
    models_dir: str,
    archive_dir: str,
    deployment: str,
    replay_id: str,
    *,
    pause_s: float,
    nice: int,
    log_level: str,
    memory_mb: int | None = None,
    run_limit_s: float | None = None,
) -> None:
    """A replay in a process of its own (the gateway spawns it): no GIL shared with the
    gateway's event loop, ``nice`` steps below live traffic, its memory bounded as a model
    worker's (``RDV_MODEL_MEMORY_MB``), its Redis commands by ``connect``'s default bound
    (one that waited for good on a silent Redis held its replay slot; a replay's large reads
    get more than ``RDV_REDIS_TIMEOUT_S``). SIGTERM stops it after its batch, resumable."""
    import os
    import signal
    from pathlib import Path

    from models.memory_bound import bound_memory
    from rendezvous.bus.connection import connect

    bound_memory(memory_mb)

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if nice:
        os.nice(nice)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_stop_when_orphaned, args=(stop,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the gateway's to handle
    client = connect(redis_url, wait_s=10)
    try:
        from models.runtime import RunLimit

        limit = RunLimit.shared(run_limit_s) if run_limit_s else None
        runner = Runner(client, ModelRegistry(Path(models_dir)), ArchiveReader(Path(archive_dir)),
                        owner=f"replay-{os.getpid()}", pause_s=pause_s, stop=stop,
                        run_limit=limit)  # fmt: skip
        runner.run(deployment, replay_id)
    finally:
        client.close()
