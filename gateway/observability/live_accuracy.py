"""Keeps each deployment's live-accuracy report in Redis, within a second of a label.

The report (``rendezvous.accuracy.accuracy_report``) is computed from the labelled stream
alone, so whichever gateway process computes it, every process shows the same figures. One
process a deployment computes it, the holder of its accuracy lease (``evaluation_leases``): every
``tick_s`` while labels come, every ``quiet_s`` once a look found none (``look_schedule``), it
asks for the labelled stream's last entry (one pipelined round trip for all it holds) and
recomputes, in a thread off the event loop, a deployment whose last entry or
revision moved (a label taken by any process; a promotion's new current versions), and every
deployment every ``interval_s``. Each evaluation stores the report (``names.accuracy_key``:
``/drift``'s ``accuracy`` section and the ``rdv_live_*`` gauges) and a point of history (the
dashboard's chart over time). Every process used to recompute each deployment it took a label
for, each reading twice the window (10-23 ms of Redis a time, twice a second a process under a
steady label feed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, cast

from prometheus_client.core import GaugeMetricFamily

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability.evaluation_leases import EvaluationLeases
from gateway.observability.look_schedule import LookSchedule
from rendezvous import names
from rendezvous.accuracy import accuracy_report
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES, said
from rendezvous.outcomes import decode_labelled
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

HISTORY_LEN = 1000
"""Points of accuracy history kept per deployment."""
READ_FACTOR = 2
"""The labelled entries read per evaluation, as a multiple of the window: room for relabels."""
LEASE_MS = 10_000
"""How long a deployment's accuracy lease lasts unrenewed: a dead holder's deployments are
taken over within this (their reports meanwhile stay as they were)."""
QUIET_LOOK_S = 1.0
"""How often a held deployment whose last look found no new label is looked at again (a label
is in the report within a second); every ``tick_s`` while labels come."""


class LiveAccuracy:
    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        instance: str,
        *,
        window: int,
        classes_of: Callable[[str, int], Awaitable[list[int] | None]],
        tick_s: float = 0.5,
        quiet_s: float = QUIET_LOOK_S,
        interval_s: float = 30.0,
    ):
        self.client = client
        self.deployments = deployments
        self.window = window
        self.classes_of = classes_of
        self.tick_s = tick_s
        self.interval_s = interval_s
        self.leases = EvaluationLeases(
            client, instance, ttl_ms=LEASE_MS, key=names.accuracy_lock_key
        )
        self.looks = LookSchedule(tick_s, quiet_s)
        self._evaluated: dict[str, tuple[Any, int]] = {}
        """Held deployment -> (last labelled entry id, revision) of its latest evaluation."""
        self._last_full = 0.0
        self.evaluations = 0

    async def evaluate(self, deployment: str) -> dict[str, Any] | None:
        dep = self.deployments.deployments.get(deployment)
        if dep is None:
            return None
        raw = await self.client.xrevrange(
            names.labelled_stream(deployment), count=self.window * READ_FACTOR
        )
        entries = decode_labelled(list(reversed(cast(list[Any], raw))))
        if not entries:
            return None
        real = dep.roles[names.REAL]
        classes = await self.classes_of(real.name, real.version)
        current = {role: str(ref) for role, ref in dep.roles.items()}
        report = await asyncio.to_thread(accuracy_report, entries, self.window, classes, current)
        now_ms = int(time.time() * 1000)
        report = {"deployment": deployment, "evaluated_at_ms": now_ms, **report}
        point = {
            "ts_ms": now_ms,
            "roles": {
                m["role"]: {
                    "model": m["model"],
                    "accuracy": m["accuracy"],
                    "labelled": m["labelled"] + m["judged"],
                }
                for m in report["models"]
                if m["current"]
            },
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.set(names.accuracy_key(deployment), json.dumps(report))
        pipe.xadd(names.accuracy_history_stream(deployment), {b"p": json.dumps(point)},
                  maxlen=HISTORY_LEN, approximate=True)  # fmt: skip
        await pipe.execute()
        self.evaluations += 1
        return report

    async def tick(self) -> None:
        now = time.monotonic()
        deployments = self.deployments.deployments
        self.leases.keep_only(deployments)
        held = await self.leases.held(sorted(deployments), now)
        for name in set(self._evaluated) - set(held):  # another holds it: afresh if it returns
            del self._evaluated[name]
        if not held:
            return
        full = now - self._last_full >= self.interval_s
        if full:
            self._last_full = now
        self.looks.keep_only(held)
        for name in held:  # a promotion's new current versions: looked at now
            dep, known = deployments.get(name), self._evaluated.get(name)
            if dep is not None and known is not None and known[1] != dep.revision:
                self.looks.soon(name)
        looked = held if full else self.looks.due(held, now)
        if not looked:
            return
        pipe = self.client.pipeline(transaction=False)
        for name in looked:
            pipe.xrevrange(names.labelled_stream(name), count=1)
        for name, last in zip(looked, await pipe.execute(), strict=True):
            dep = deployments.get(name)
            if dep is None or not last:
                self.looks.looked(name, now, news=False)
                continue
            seen = (last[0][0], dep.revision)
            news = self._evaluated.get(name) != seen
            self.looks.looked(name, now, news=news)
            if full or news:
                await self.evaluate(name)
                self._evaluated[name] = seen

    async def release(self) -> None:
        """Give up this process's leases (at shutdown): another takes over at its next check."""
        await self.leases.release()

    async def run(self) -> None:
        retry_log = RetryLog(log, "live accuracy evaluation")
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
                retry_log.succeeded()
            except REDIS_FAILURES as exc:
                retry_log.failed(said(exc))
            except Exception as exc:
                retry_log.failed(f"failed ({exc!r})", level=logging.ERROR, exc_info=exc)


async def accuracy_view(client: AsyncClient, deployment: str, history: int = 360) -> dict[str, Any]:
    """The ``accuracy`` section of ``/v1/deployments/{d}/drift``: the latest report and its
    history, oldest first."""
    pipe = client.pipeline(transaction=False)
    pipe.get(names.accuracy_key(deployment))
    pipe.xrevrange(names.accuracy_history_stream(deployment), count=history)
    raw, points = await pipe.execute()
    report = _finite_json(raw) if raw else None
    return {
        "current": report,
        "history": [_finite_json(f[b"p"]) for _id, f in reversed(points)],
    }


def _finite_json(raw: bytes | str) -> Any:
    """A stored report, with any NaN or infinity as null: the route answers strict JSON, and a
    point stored before weights were bounded must not make it fail for a thousand points."""
    return json.loads(raw, parse_constant=lambda _constant: None)


def accuracy_families(reports: Mapping[str, Mapping[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """The ``rdv_live_*`` gauges of each role's current version, from the stored reports."""
    labels = ["deployment", "role"]
    families = {
        "accuracy": GaugeMetricFamily(
            "rdv_live_accuracy",
            "Accuracy of the role's current version on the latest labelled requests.",
            labels=labels,
        ),
        "labelled": GaugeMetricFamily(
            "rdv_live_labelled",
            "Labelled requests (with judgements) behind the role's live figures.",
            labels=labels,
        ),
        "log_loss": GaugeMetricFamily(
            "rdv_live_log_loss", "Log loss of the role's current version.", labels=labels
        ),
        "brier": GaugeMetricFamily(
            "rdv_live_brier", "Brier score of the role's current version.", labels=labels
        ),
        "ece": GaugeMetricFamily(
            "rdv_live_calibration_error",
            "Expected calibration error (10 confidence bins) of the role's current version.",
            labels=labels,
        ),
    }
    for dep, report in sorted(reports.items()):
        for model in report.get("models") or []:
            if not model.get("current"):
                continue
            values = {**model, "labelled": model["labelled"] + model["judged"]}
            for key, family in families.items():
                if values.get(key) is not None:
                    family.add_metric([dep, model["role"]], float(values[key]))
    yield from families.values()
