"""Evaluates drift per deployment from the gateways' sketches and keeps the report, history
and the alerts of its own kinds.

One gateway process at a time evaluates a deployment (a short Redis lease renewed by its holder,
``evaluation_leases``), so several processes or instances never double-count an event. It evaluates
once ``evaluate_every`` new requests are in the sketch stream (checked every ``tick_s`` while
sketches come, every ``quiet_s`` once a look found none: ``look_schedule``) and at least every
``interval_s``. An evaluation merges the newest sketches of the current real model
into a window (at most ``window_requests`` requests, none older than ``window_s``), compares it
with the references through the pure functions of ``rendezvous.drift_alerts``, and stores the
outcome: the report (read by ``/drift`` and ``/metrics``), a point of history every
``interval_s``, and its alerts as the ``monitor``'s claim in the shared alert list
(``drift_store``), next to the online detectors' (the log bins' feature detectors, the gateway
processes' prediction prior). An alert of the monitor is raised when the window and its latest
``clear_requests`` are over the threshold, and cleared as soon as that latest part is back under
it.

The leading process also sends the deployment's alert events, whoever decided them, to the
webhooks (``drift_relay``: from the events stream, each URL at its own pace).

The sketches' window and the real model's score reference (its training distribution, or its
first full window as real; a multiclass model's predicted-class mix with it): ``drift_sketches``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, cast

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_features, drift_store
from gateway.observability.alert_webhooks import AlertWebhooks
from gateway.observability.drift_online import announce
from gateway.observability.drift_relay import DriftRelay
from gateway.observability.drift_sketches import (
    SCAN_LIMIT,
    Entries,
    ModelMeta,
    ScoreReferences,
    decode_sketches,
    merge_window,
)
from gateway.observability.drift_view import MONITOR, thresholds_from
from gateway.observability.evaluation_leases import EvaluationLeases
from gateway.observability.look_schedule import LookSchedule
from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES, said
from rendezvous.drift import Sketch
from rendezvous.drift_alerts import Thresholds, evaluate_alerts, window_report
from rendezvous.drift_reference import FeatureReference, FeatureReferences
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

PAGE = 64
"""Sketch entries read per round trip, newest first, until the window is full."""
IDLE_INTERVAL_S = 60.0
"""How often a deployment with no new sketches is evaluated (its report and history age)."""
QUIET_LOOK_S = 2.0
"""How often a led deployment whose last look found no new sketch is looked at again; every
``tick_s`` while they come. (Its alert events go out on their own: ``drift_relay``.)"""


class DriftMonitor:
    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        instance: str,
        *,
        interval_s: float = 5.0,
        window_requests: int = 1000,
        window_s: float = 600.0,
        history_len: int = 360,
        defaults: Thresholds | None = None,
        local_meta: ModelMeta | None = None,
        webhooks: AlertWebhooks | None = None,
        evaluate_every: int = 200,
        tick_s: float = 0.5,
        quiet_s: float = QUIET_LOOK_S,
        clear_requests: int | None = None,
    ):
        self.client = client
        self.deployments = deployments
        self.instance = instance
        self.interval_s = interval_s
        self.window_requests = window_requests
        self.window_s = window_s
        self.history_len = history_len
        self.defaults = defaults or Thresholds()
        self.references = ScoreReferences(client, window_requests, local_meta)
        self.evaluate_every = evaluate_every
        """Evaluate once this many requests are new in the sketches (and every interval)."""
        self.tick_s = min(tick_s, interval_s)
        self.looks = LookSchedule(self.tick_s, min(quiet_s, interval_s))
        """When each led deployment's sketches and events are next read."""
        self.clear_requests = clear_requests or max(window_requests * 2 // 5, 1)
        """Requests of the window's latest part, which clears an alert."""
        self._features = FeatureReferences()
        self._last_eval: dict[str, float] = {}
        self._last_seen: dict[str, bytes] = {}
        self._revisions: dict[str, int | None] = {}
        """The revision each led deployment was last judged at: a change (a promotion or a
        rollback with no traffic) is evaluated at once, not up to ``IDLE_INTERVAL_S`` later,
        when the report still named the old real and its alerts (found by a helper's probe)."""
        self.leases = EvaluationLeases(client, instance, ttl_ms=int(interval_s * 3000) + 1000)
        """Which deployments this process evaluates."""
        self._last_point: dict[str, float] = {}
        self._unrecorded: set[str] = set()  # latest evaluation not yet a point of history
        self._relay = DriftRelay(client, webhooks)

    async def run(self) -> None:
        retry_log = RetryLog(log, "drift evaluation: which deployments are due")
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                led, _looked, due = await self._due_deployments()
                self._relay.lead(led)
                retry_log.succeeded()
            except REDIS_FAILURES as exc:
                retry_log.failed(said(exc))
                continue
            except Exception as exc:  # a bug must not end the monitor for good
                retry_log.failed(f"failed ({exc!r})", level=logging.ERROR, exc_info=exc)
                continue
            for deployment in due:
                try:
                    await self.evaluate(deployment)
                except REDIS_FAILURES as exc:
                    log.warning("drift evaluation of %s failed: %s", deployment, exc)
                except Exception:
                    log.exception("drift evaluation of %s failed", deployment)

    async def _due_deployments(self) -> tuple[list[str], list[str], list[str]]:
        """The deployments this process leads, those of them looked at now (``looks``), and
        those due an evaluation: once ``evaluate_every`` requests came into their sketch
        stream since the last one, or once ``interval_s`` passed if any came or the latest
        evaluation is not yet in the history (it came too soon after the last point: traffic
        that stops must still leave its final state on the chart), or ``IDLE_INTERVAL_S`` if
        none did (an idle deployment's report only ages; twenty of them evaluated every 5 s
        cost a gateway 1-2 % of a core), or once its revision moved (a promotion or a
        rollback names another real: known without a look). The newest sketches of those
        looked at are read in one round trip (per node)."""
        now = time.monotonic()
        live = self.deployments.deployments
        self.leases.keep_only(live)
        self._features.keep_only(live)
        for kept in (self._revisions, self._last_eval, self._last_seen, self._last_point):
            for gone in [d for d in kept if d not in live]:  # deleted: never asked again
                del kept[gone]
        self._unrecorded &= set(live)
        led = await self.leases.held(sorted(live), now)
        self.looks.keep_only(led)
        if not led:
            return led, [], []
        looked = self.looks.due(led, now)
        pipe = self.client.pipeline(transaction=False)
        for deployment in looked:
            last = self._last_seen.get(deployment)
            low = b"(" + last if last else "-"
            pipe.xrevrange(names.drift_sketch_stream(deployment), "+", low, count=PAGE)
        found = dict(zip(looked, await pipe.execute(raise_on_error=False), strict=True)
                     if looked else ())  # fmt: skip
        due = []
        for deployment in led:
            entries = found.get(deployment, ())  # not looked at: its last look found none
            if isinstance(entries, Exception):
                log.warning("drift evaluation of %s: cannot read its sketches: %s", deployment,
                            entries)  # fmt: skip
                continue
            if deployment in found:
                self.looks.looked(deployment, now, news=bool(entries))
            since = now - self._last_eval.get(deployment, -math.inf)
            new = sum(s.requests for s in decode_sketches(cast(Entries, entries)))
            pending = new > 0 or deployment in self._unrecorded
            dep = self.deployments.deployments.get(deployment)
            revision = dep.revision if dep is not None else None
            if (new >= self.evaluate_every or (since >= self.interval_s and pending)
                    or since >= max(self.interval_s, IDLE_INTERVAL_S)
                    or revision != self._revisions.setdefault(deployment, revision)):  # fmt: skip
                self._revisions[deployment] = revision
                due.append(deployment)
        return led, looked, due

    @property
    def relay(self) -> DriftRelay:
        """Sends the led deployments' alert events to the webhooks (``drift_relay``)."""
        return self._relay

    async def release(self) -> None:
        """Stop sending alert events and give up this process's evaluation leases (at
        shutdown; see ``EvaluationLeases``)."""
        await self._relay.close()
        await self.leases.release()

    def _feature_reference(self, deployment: str) -> FeatureReference | None:
        return self._features.of(deployment, self.deployments.deployments[deployment].feature_spec)

    async def evaluate(self, deployment: str, now_ms: float | None = None) -> dict[str, Any]:
        """One evaluation: read, compute, store. Returns the stored report."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        dep = self.deployments.get(deployment)
        real = dep.roles[names.REAL]
        self._last_eval[deployment] = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        pipe.get(names.drift_report_key(deployment))
        pipe.get(names.drift_thresholds_key(deployment))
        pipe.hget(names.MODELS_INDEX, str(real))
        pipe.get(names.drift_reference_key(deployment))
        previous_raw, thresholds_raw, meta_raw, reference_raw = await pipe.execute()
        sketches, oldest_taken = await self._newest(deployment, str(real), now_ms)

        features = self._feature_reference(deployment)
        version = features.version if features else None
        latest = merge_window(list(sketches), str(real), version, self.clear_requests)
        window = merge_window(sketches, str(real), version, self.window_requests)
        reference = await self.references.of(
            deployment, real.name, real.version, meta_raw, reference_raw
        )
        thresholds = thresholds_from(thresholds_raw, self.defaults)
        report, recent = (
            window_report(
                w,
                score_reference=reference.scores,
                reference_source=reference.source,
                features=features,
                thresholds=thresholds,
                class_reference=reference.classes,
                class_labels=reference.class_labels,
            )
            for w in (window, latest)
        )
        previous = json.loads(previous_raw) if previous_raw else {}
        active, _events = evaluate_alerts(
            report, thresholds, previous.get("alerts") or {}, now_ms, recent=recent
        )
        stored = {
            "deployment": deployment,
            # a sketch another gateway closed while this one read counts in the window: the
            # evaluation is of data up to its end (it read ms after it; a test caught the race)
            "evaluated_at_ms": max(now_ms, window.end_ms or 0.0),
            "window": {
                "requests": self.window_requests,
                "seconds": self.window_s,
                "interval_s": self.interval_s,
                "clear_requests": self.clear_requests,
                "evaluate_every": self.evaluate_every,
            },
            "thresholds": thresholds.to_dict(),
            "current": report,
            "latest": {"requests": recent["requests"], "values": recent["values"]},
            "alerts": active,
        }
        point = {
            "ts_ms": now_ms,
            "status": report["status"],
            "requests": report["requests"],
            "divergence_p90": report["divergence"]["p90"],
            "ood_rate": (report["ood"] or {}).get("rate"),
            "distance_p90": ((report["ood"] or {}).get("distance") or {}).get("p90"),
            **report["values"],
        }
        # The alerts first, then the report: a reader that sees this evaluation's report sees
        # its alerts too (the other order showed a new window beside the alerts of the last).
        figures = {
            kind: {"value": recent["values"].get(kind) if recent["status"] == "ok" else value,
                   "threshold": getattr(thresholds, kind)}
            for kind, value in report["values"].items()
        }  # fmt: skip
        events = await drift_store.claim(
            self.client,
            deployment,
            MONITOR,
            {kind: {**alert, "feature": None} for kind, alert in active.items()},
            stale_ms=self._claim_stale_ms(),
            figures=figures,
            now_ms=now_ms,
        )
        announce(deployment, events)  # the webhooks hear it from the events stream
        pipe = self.client.pipeline(transaction=False)
        pipe.set(names.drift_report_key(deployment), json.dumps(stored))
        due = now_ms - self._last_point.get(deployment, 0.0) >= self.interval_s * 1000 * 0.9
        if due:
            self._last_point[deployment] = now_ms
            self._unrecorded.discard(deployment)
            pipe.xadd(
                names.drift_history_stream(deployment),
                {b"p": json.dumps(point)},
                maxlen=self.history_len,
                approximate=False,
            )
        else:
            self._unrecorded.add(deployment)
        drift_features.store(pipe, deployment, drift_features.snapshot(window, features, now_ms),
                             report["features"]["psi"], dep.feature_spec,
                             self.history_len if due else None)  # fmt: skip
        if reference.source is not None:  # settled: older sketches have no reader left
            minid = oldest_taken or f"{int(now_ms - self.window_s * 1000)}-0"
            pipe.xtrim(names.drift_sketch_stream(deployment), minid=minid, approximate=False)
        await pipe.execute()
        return stored

    def _claim_stale_ms(self) -> float:
        """How long the claim holds unrenewed: past the longest wait between a living leader's
        evaluations (``IDLE_INTERVAL_S``, idle) and a lease hand-over, so that a pause in the
        traffic does not clear the monitor's alerts (to raise them again a minute later)."""
        return (max(self.interval_s, IDLE_INTERVAL_S) + 3 * self.interval_s) * 1000 + 2000

    async def _newest(
        self, deployment: str, real: str, now_ms: float
    ) -> tuple[list[Sketch], bytes | None]:
        """The newest sketches, newest first, a page at a time until they hold a window of
        ``real``'s requests (or reach ``window_s`` back), and the id of the oldest one taken.

        Nothing reads a sketch older than that once the score reference is settled, so the
        evaluation trims the stream there: it then holds about a window, not the
        ``drift_sketch_maxlen`` entries (20,000: forty minutes of two gateway processes'
        sketches, Redis growing all the while)."""
        key = names.drift_sketch_stream(deployment)
        oldest = int(now_ms - self.window_s * 1000)
        out: list[Sketch] = []
        requests = 0
        high: str | bytes = "+"
        oldest_taken: bytes | None = None
        while len(out) < SCAN_LIMIT:
            entries = cast(Entries, await self.client.xrevrange(key, high, oldest, count=PAGE))
            if not entries:
                break
            if high == "+":
                self._last_seen[deployment] = entries[0][0]
            for entry in entries:
                oldest_taken = entry[0]
                for sketch in decode_sketches([entry]):
                    out.append(sketch)
                    requests += sketch.requests if sketch.real_model == real else 0
                if requests >= self.window_requests:
                    return out, oldest_taken
            if len(entries) < PAGE:
                break
            high = b"(" + entries[-1][0]
        return out, oldest_taken
