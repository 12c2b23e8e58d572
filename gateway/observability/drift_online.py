"""Runs the prediction-prior detector (``rendezvous.drift_prior.PriorDetector``) on this
gateway process's decisions, and says what it finds through the shared alert list
(``drift_store``).

Only the prior stays in the gateway: it judges real's predicted class, which only the decision
records carry. The feature detectors judge the inputs, which the log bin reads anyway, every
request of the deployment in batches: they run there (``models.feature_watch``), off the request
path.

Once a decision record is written, real's predicted labels are appended to a list:
microseconds. A callback on the event loop, at most every ``min_interval_s`` (50 ms), hands
them to the detector in one step. A raise or a clear is written at once (one script call), and
the process's claim is renewed every ``publish_s`` with a summary for the report.

Every gateway process judges only the decisions it closed: with two processes each sees about
half of the traffic, and either may raise the alert; it clears once no process holds it.

A process that dies leaves its claim to go stale, and its alert would then clear though the
feed is still broken (a "resolved", and a "firing" again once a fresh detector has seen enough:
a restarted gateway has a new instance name). So the alert is handed between processes
(``prior_handover``): another process judging the same real model adopts it and holds it until
its own detector can say for itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.gateway_claims import orphaned
from gateway.observability.prior_handover import DeploymentPrior, Handover
from rendezvous import drift_claims, names
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.decision import DecisionRecord
from rendezvous.drift_prior import PriorDetector, prior_labels, prior_reference
from rendezvous.drift_settings import DetectorSettings
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)


ORPHAN_LOOK_S = 2.0
"""How often the claims of deployments with no traffic here are read for orphaned alerts (a
dead claim is adoptable from ``orphan_after_s``, 3 s, until it goes stale at 10 s)."""


class OnlineDrift:
    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        instance: str,
        *,
        local_meta: Callable[[str, int], Mapping[str, Any] | None] | None = None,
        settings: DetectorSettings | None = None,
        min_interval_s: float = 0.05,
        publish_s: float = 1.0,
        stale_s: float = 10.0,
        orphan_after_s: float = 3.0,
    ):
        self.client = client
        self.deployments = deployments
        self.source = f"{drift_claims.GATEWAY_SOURCE}{instance}"
        self.local_meta = local_meta
        self.settings = settings or DetectorSettings()
        self.min_interval_s = min_interval_s
        self.publish_s = publish_s
        self.stale_ms = stale_s * 1000
        self.orphan_after_ms = orphan_after_s * 1000
        """A gateway claim not renewed for this long is a dead process's (they renew every
        ``publish_s``): its alert is adopted before the claim goes stale at ``stale_s``."""
        self.hold_rows = self.settings.drift_window
        self.handover = Handover(self.source, self.orphan_after_ms, self.hold_rows)
        self._deps: dict[str, DeploymentPrior] = {}
        self._references: dict[str, tuple[float | list[float], list[Any] | None] | None] = {}
        """Model -> its prior's reference and class names (None: it has none)."""
        self._looking_up: set[str] = set()
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._retry_logs: dict[str, RetryLog] = {}
        """Per deployment: an outage is said once, then every 30 s, not at every second's
        claim (a helper's probe: 82 lines a process in 40 s)."""
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- per decision: append, maybe schedule -----------------------------------------------

    def observe_decision(self, record: DecisionRecord) -> None:
        real = record.outputs.get(names.REAL)
        if real is None or real.probabilities is None:
            return
        dep = self._deps.get(record.deployment) or self._deps.setdefault(
            record.deployment, DeploymentPrior()
        )
        key = real.model_key
        if dep.model != key:
            self._new_model(record.deployment, dep, key)
        if dep.prior is None:
            return
        width = len(dep.prior.shares)
        for row in real.probabilities:
            if len(row) != width:
                continue
            dep.labels.append(row[1] >= 0.5 if width == 2 else row.index(max(row)))
        if dep.labels and not dep.scheduled:  # judged within min_interval_s
            self._schedule(record.deployment, dep)

    def _schedule(self, deployment: str, dep: DeploymentPrior) -> None:
        loop = asyncio.get_running_loop()
        dep.scheduled = True
        delay = max(0.0, dep.last_run + self.min_interval_s - loop.time())
        loop.call_later(delay, self.evaluate, deployment)

    # -- judging ----------------------------------------------------------------------------

    def evaluate(self, deployment: str) -> None:
        """Hand the waiting labels to the detector (a loop callback)."""
        dep = self._deps.get(deployment)
        if dep is None:
            return
        dep.scheduled = False
        dep.last_run = asyncio.get_running_loop().time()
        labels, dep.labels = dep.labels, []
        try:
            if dep.prior is not None and labels:
                what, alert = dep.prior.update(labels)
                if what is not None:
                    dep.note([alert] if what == "raised" else [],
                               [alert] if what == "cleared" else [])  # fmt: skip
                if what == "cleared":
                    self.handover.cleared_own(dep)
                self.handover.release_held(deployment, dep)
        except Exception:
            log.exception("online drift detectors of %s failed", deployment)
        if dep.changed and deployment not in self._publishing:
            self._spawn_publish(deployment)

    def _retry_log(self, deployment: str) -> RetryLog:
        found = self._retry_logs.get(deployment)
        if found is None:
            found = self._retry_logs[deployment] = RetryLog(
                log, f"online drift: writing the alerts of {deployment}"
            )
        return found

    # -- alerts of a process that died --------------------------------------------------------

    async def adopt_unseen(self) -> None:
        """The deployments this process has judged no decision of: one whose gateway process
        died holding its prior alert (a restart, with no traffic yet) saw the alert cleared
        once the dead claim went stale, and raised again at the first traffic (a helper's
        probe). Their claims are read (one round trip) and an orphaned alert of their real
        model adopted, as traffic would have had it adopted."""
        live = self.deployments.deployments
        unseen = [d for d in live if d not in self._deps]
        if not unseen:
            return
        pipe = self.client.pipeline(transaction=False)
        for deployment in unseen:
            pipe.hgetall(names.drift_claims_key(deployment))
        now_ms = time.time() * 1000
        for deployment, raw in zip(unseen, await pipe.execute(raise_on_error=False), strict=True):
            real = live[deployment].roles.get(names.REAL) if deployment in live else None
            if isinstance(raw, Exception) or real is None:
                continue
            claims = drift_store.parse({}, {}, raw)["claims"]
            if not any(orphaned(claims, self.source, str(real), now_ms, self.orphan_after_ms)):
                continue
            dep = self._deps.setdefault(deployment, DeploymentPrior())
            self._new_model(deployment, dep, str(real))
            self.handover.adopt(deployment, dep, claims)
            if dep.changed and deployment not in self._publishing:
                self._spawn_publish(deployment)

    def _new_model(self, deployment: str, dep: DeploymentPrior, key: str) -> None:
        """A promotion (or the first record): the prior is judged against the new real's
        training scores, once they are known."""
        if dep.prior is not None and dep.prior.active is not None:
            dep.figures["prediction_prior"] = {"value": None, "threshold": None}
            dep.changed = True
        if dep.held:  # about the previous real model
            dep.figures.update(drift_claims.cleared_figures(dep.held.values()))
            dep.changed = True
        dep.forget_held()
        dep.model, dep.prior = key, None
        if key in self._references:
            dep.prior = self._prior(key)
        elif key not in self._looking_up:
            self._looking_up.add(key)
            self._spawn(self._look_up(deployment, key))

    def _prior(self, key: str) -> PriorDetector | None:
        known = self._references.get(key)
        return None if known is None else PriorDetector(known[0], self.settings, known[1])

    async def _look_up(self, deployment: str, key: str) -> None:
        """The model's prior reference (a binary model's training score histogram, a multiclass
        one's class reference): from the registry index in Redis, else from this host's
        registry files."""
        try:
            raw = await self.client.hget(names.MODELS_INDEX, key)
            meta: Mapping[str, Any] | None = json.loads(raw) if raw else None
            if meta is None and self.local_meta is not None:
                name, _, version = key.rpartition(":")
                meta = await asyncio.to_thread(self.local_meta, name, int(version))
            reference = prior_reference(meta) if meta else None
            self._references[key] = (
                None if reference is None else (reference, prior_labels(meta or {}))
            )
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
            dep.prior = self._prior(key)

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
            retire, dep.retire = dep.retire, {}
            try:
                decided, claims = await drift_store.claim_and_read(
                    self.client,
                    deployment,
                    self.source,
                    dep.active(),
                    stale_ms=self.stale_ms,
                    figures=figures,
                    extra=self._summary(dep),
                    retire=retire,
                )
            except REDIS_FAILURES as exc:
                self._retry_log(deployment).failed(exc)
                dep.figures = {**figures, **dep.figures}
                dep.retire = {**retire, **dep.retire}
                dep.changed = True
                break
            self._retry_log(deployment).succeeded()
            events += decided
            self.handover.adopt(deployment, dep, claims)
            self.handover.let_go_for_others(deployment, dep, claims)
            self.handover.let_go_when_idle(deployment, dep, claims)
            if not dep.changed:
                break
        announce(deployment, events)
        return events

    def _summary(self, dep: DeploymentPrior) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": dep.model}
        if dep.held:
            doc["held"] = {"alerts": sorted(dep.held), "until_rows": dep.hold_until}
        if dep.prior is not None:
            prior, latest = dep.prior, dep.prior.alert()
            doc["prior"] = {"rows": prior.rows_seen, "reference": prior.reference,
                            "share": latest["value"], "share_rows": latest["rows"]}  # fmt: skip
            if prior.reference is None:  # multiclass: the class that moved most, its share
                doc["prior"].update(reference=latest["threshold"],
                                    **{"class": prior.named(prior.moved())})  # fmt: skip
        return doc

    async def run(self) -> None:
        """Judge what waits at low rates, renew the claims every ``publish_s``, and adopt the
        orphaned alerts of deployments with no traffic here every ``ORPHAN_LOOK_S``."""
        next_look = 0.0
        while True:
            await asyncio.sleep(self.publish_s)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + ORPHAN_LOOK_S
                try:
                    await self.adopt_unseen()
                except REDIS_FAILURES as exc:
                    log.debug("online drift: cannot read the claims now: %s", exc)
            for deployment in list(self._deps):
                if deployment not in self.deployments.deployments:
                    del self._deps[deployment]  # deleted: renewing its claims would remake them
                    continue
                try:
                    if self._deps[deployment].labels:
                        self.evaluate(deployment)
                    if deployment not in self._publishing:
                        await self.publish(deployment)
                except Exception:  # a bug must not end the online judge for good
                    log.exception("online drift of %s failed", deployment)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def announce(deployment: str, events: list[dict[str, Any]]) -> None:
    """A log line per raise and clear (the webhooks hear them from the deployment's events
    stream: ``drift_relay``)."""
    for event in events:
        log.warning("%s", drift_claims.event_line(deployment, event))
