"""Runs the online drift detectors (``rendezvous.drift_detect``) on this gateway process's own
traffic, and says what they find through the shared alert list (``drift_store``).

The request path only appends a request's rows (and, once its decision record is written,
real's predicted labels) to a list: microseconds. A callback on the event loop, at most every
``min_interval_s`` (50 ms), hands what waits to the detectors in one vectorised step (about
0.2 ms for 16 rows of 30 features; the batches grow with the rate, so the cost per row falls as
traffic rises: at most 20 steps a second per deployment). No Redis round trip stands between a
row and its judgement: a raise or a clear is written at once (one script call), and the
process's claim is renewed every ``publish_s`` with a summary of its detectors for the report.

Every gateway process judges only the rows it served: with two processes each sees about half
of the traffic, and either may raise an alert; an alert clears once no process holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.alert_webhooks import AlertWebhooks
from rendezvous import names
from rendezvous.bus.connection import REDIS_FAILURES, AsyncClient
from rendezvous.decision import DecisionRecord
from rendezvous.drift_detect import (
    DetectorSettings,
    FeatureDetectors,
    FeatureProfile,
    PriorDetector,
)
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 20_000
"""Rows waiting for the detectors at most; beyond, new rows are left out (counted)."""


def positive_share(score_reference: list[float] | None) -> float | None:
    """Share of training scores at or above 0.5 (the score histogram's upper five bins)."""
    if not score_reference or len(score_reference) != 10:
        return None
    total = float(sum(score_reference))
    return float(sum(score_reference[5:])) / total if total > 0 else None


@dataclass
class _Deployment:
    spec: FeatureSpec | None = None
    features: FeatureDetectors | None = None
    prior: PriorDetector | None = None
    model: str | None = None
    """The real model the prior detector judges (``name:version``)."""
    rows: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    labels: list[bool] = field(default_factory=list)
    scheduled: bool = False
    last_run: float = 0.0
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Statistics of the alerts released since the last claim (for their clear events)."""
    changed: bool = False
    dropped: int = 0


class OnlineDrift:
    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        instance: str,
        *,
        webhooks: AlertWebhooks | None = None,
        local_meta: Callable[[str, int], Mapping[str, Any] | None] | None = None,
        settings: DetectorSettings | None = None,
        min_interval_s: float = 0.05,
        publish_s: float = 1.0,
        stale_s: float = 10.0,
    ):
        self.client = client
        self.deployments = deployments
        self.source = f"gateway:{instance}"
        self.webhooks = webhooks
        self.local_meta = local_meta
        self.settings = settings or DetectorSettings()
        self.min_interval_s = min_interval_s
        self.publish_s = publish_s
        self.stale_ms = stale_s * 1000
        self._deps: dict[str, _Deployment] = {}
        self._profiles: dict[int, FeatureProfile | None] = {}
        self._references: dict[str, float | None] = {}
        self._looking_up: set[str] = set()
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the request path: append, maybe schedule -------------------------------------------

    def observe_rows(self, deployment: str, features: np.ndarray) -> None:
        dep = self._deps.get(deployment) or self._deps.setdefault(deployment, _Deployment())
        if dep.pending_rows >= MAX_PENDING_ROWS:
            dep.dropped += len(features)
            return
        dep.rows.append(features)
        dep.pending_rows += len(features)
        if not dep.scheduled:  # judged within min_interval_s: batches grow with the rate
            self._schedule(deployment, dep)

    def observe_decision(self, record: DecisionRecord) -> None:
        real = record.outputs.get(names.REAL)
        if real is None or real.probabilities is None:
            return
        dep = self._deps.get(record.deployment) or self._deps.setdefault(
            record.deployment, _Deployment()
        )
        key = real.model_key
        if dep.model != key:
            self._new_model(record.deployment, dep, key)
        if dep.prior is None:
            return
        for row in real.probabilities:
            if len(row) == 2:
                dep.labels.append(row[1] >= 0.5)

    def _schedule(self, deployment: str, dep: _Deployment) -> None:
        loop = asyncio.get_running_loop()
        dep.scheduled = True
        delay = max(0.0, dep.last_run + self.min_interval_s - loop.time())
        loop.call_later(delay, self.evaluate, deployment)

    # -- judging ----------------------------------------------------------------------------

    def _feature_detectors(self, deployment: str, dep: _Deployment) -> FeatureDetectors | None:
        state = self.deployments.deployments.get(deployment)
        if state is None:
            return None
        spec = state.feature_spec
        if spec is not dep.spec and (dep.spec is None or spec.to_dict() != dep.spec.to_dict()):
            profile = FeatureProfile.from_spec(spec)
            old = dep.features
            dep.features = FeatureDetectors(profile, self.settings) if profile else None
            if old is not None:  # new training statistics: what the old ones held is void
                for alert_id, alert in old.active.items():
                    dep.figures[alert_id] = {"value": alert.get("value"), "threshold": None}
                dep.changed = True
        dep.spec = spec
        return dep.features

    def evaluate(self, deployment: str) -> None:
        """Hand the waiting rows and labels to the detectors (a loop callback)."""
        dep = self._deps.get(deployment)
        if dep is None:
            return
        dep.scheduled = False
        dep.last_run = asyncio.get_running_loop().time()
        rows, dep.rows, dep.pending_rows = dep.rows, [], 0
        labels, dep.labels = dep.labels, []
        try:
            detectors = self._feature_detectors(deployment, dep)
            width = dep.spec.width if dep.spec is not None else 0
            fit = [r for r in rows if r.ndim == 2 and r.shape[1] == width]
            if detectors is not None and fit:
                raised, cleared = detectors.update(np.concatenate(fit))
                self._note(dep, raised, cleared)
            if dep.prior is not None and labels:
                what, alert = dep.prior.update(labels)
                if what is not None:
                    self._note(dep, [alert] if what == "raised" else [],
                               [alert] if what == "cleared" else [])  # fmt: skip
                    if detectors is not None:
                        detectors.external_episode = dep.prior.active is not None
                        if dep.prior.active is None:
                            self._note(dep, [], detectors.end_episode())
        except Exception:
            log.exception("online drift detectors of %s failed", deployment)
        if dep.changed and deployment not in self._publishing:
            self._spawn_publish(deployment)

    def _note(
        self, dep: _Deployment, raised: list[dict[str, Any]], cleared: list[dict[str, Any]]
    ) -> None:
        for alert in cleared:
            dep.figures[_alert_id(alert)] = {"value": alert.get("value"),
                                             "threshold": alert.get("threshold")}  # fmt: skip
        if raised or cleared:
            dep.changed = True

    def _active(self, dep: _Deployment) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if dep.features is not None:
            out.update(dep.features.active)
        if dep.prior is not None and dep.prior.active is not None:
            out["prediction_prior"] = dep.prior.active
        return out

    def _new_model(self, deployment: str, dep: _Deployment, key: str) -> None:
        """A promotion (or the first record): the prior is judged against the new real's
        training scores, once they are known."""
        if dep.prior is not None and dep.prior.active is not None:
            dep.figures["prediction_prior"] = {"value": None, "threshold": None}
            dep.changed = True
        dep.model, dep.prior = key, None
        if dep.features is not None:
            dep.features.external_episode = False
        if key in self._references:
            share = self._references[key]
            dep.prior = PriorDetector(share, self.settings) if share is not None else None
        elif key not in self._looking_up:
            self._looking_up.add(key)
            self._spawn(self._look_up(deployment, key))

    async def _look_up(self, deployment: str, key: str) -> None:
        """The model's training score histogram: from the registry index in Redis, else from
        this host's registry files."""
        try:
            raw = await self.client.hget(names.MODELS_INDEX, key)
            meta: Mapping[str, Any] | None = json.loads(raw) if raw else None
            if meta is None and self.local_meta is not None:
                name, _, version = key.rpartition(":")
                meta = await asyncio.to_thread(self.local_meta, name, int(version))
            self._references[key] = positive_share(meta.get("score_reference")) if meta else None
        except REDIS_FAILURES as exc:
            log.warning("online drift: no score reference for %s yet: %s", key, exc)
            self._looking_up.discard(key)
            return
        except ValueError as exc:
            log.warning("online drift: no score reference for %s yet: %s", key, exc)
            self._looking_up.discard(key)
            return
        self._looking_up.discard(key)
        dep = self._deps.get(deployment)
        if dep is not None and dep.model == key and dep.prior is None:
            share = self._references[key]
            dep.prior = PriorDetector(share, self.settings) if share is not None else None

    # -- telling ----------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_publish(self, deployment: str) -> None:
        task = self._spawn(self.publish(deployment))
        self._publishing[deployment] = task
        task.add_done_callback(lambda _t: self._publishing.pop(deployment, None))

    async def publish(self, deployment: str) -> list[dict[str, Any]]:
        """Write this process's claim for ``deployment`` and act on the events it decided."""
        dep = self._deps.get(deployment)
        if dep is None:
            return []
        events: list[dict[str, Any]] = []
        while True:
            dep.changed = False
            figures, dep.figures = dep.figures, {}
            try:
                events += await drift_store.claim(
                    self.client,
                    deployment,
                    self.source,
                    self._active(dep),
                    stale_ms=self.stale_ms,
                    figures=figures,
                    extra=self._summary(dep),
                )
            except REDIS_FAILURES as exc:
                log.warning("cannot write the online drift alerts of %s: %s", deployment, exc)
                dep.figures = {**figures, **dep.figures}
                dep.changed = True
                break
            if not dep.changed:
                break
        announce(deployment, events, self.webhooks)
        return events

    def _summary(self, dep: _Deployment) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": dep.model, "dropped_rows": dep.dropped}
        if dep.features is not None:
            doc["rows"] = dep.features.rows_seen
            doc["features"] = dep.features.summary()
        if dep.prior is not None:
            latest = dep.prior.alert()
            doc["prior"] = {"rows": dep.prior.rows_seen, "reference": dep.prior.reference,
                            "share": latest["value"], "share_rows": latest["rows"]}  # fmt: skip
        return doc

    async def run(self) -> None:
        """Judge what waits at low rates, and renew the claims every ``publish_s``."""
        while True:
            await asyncio.sleep(self.publish_s)
            for deployment in list(self._deps):
                dep = self._deps[deployment]
                if dep.pending_rows or dep.labels:
                    self.evaluate(deployment)
                if deployment not in self._publishing:
                    try:
                        await self.publish(deployment)
                    except Exception:
                        log.exception("online drift claim of %s failed", deployment)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _alert_id(alert: Mapping[str, Any]) -> str:
    feature = alert.get("feature")
    return f"{alert['kind']}/{feature}" if feature else str(alert["kind"])


def announce(deployment: str, events: list[dict[str, Any]], webhooks: AlertWebhooks | None) -> None:
    """A log line per raise and clear, and the webhooks (queued: nothing waits for them)."""
    for event in events:
        value, threshold = event.get("value"), event.get("threshold")
        log.warning(
            "drift alert %s on %s: %s%s %s (threshold %s)%s",
            event.get("type"),
            deployment,
            event.get("kind"),
            f" [{event['feature']}]" if event.get("feature") else "",
            f"{value:.4g}" if isinstance(value, int | float) else value,
            f"{threshold:.4g}" if isinstance(threshold, int | float) else threshold,
            f": {event['detail']}" if event.get("detail") and event.get("type") == "raised" else "",
        )
    if events and webhooks is not None:
        webhooks.notify(deployment, events, {})
