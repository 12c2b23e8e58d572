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
a restarted gateway has a new instance name). So a process that judges the same real model
adopts the prior alert of a gateway claim no longer renewed (``orphan_after_s``, well before it
goes stale) and holds it until its own detector has judged ``hold_rows`` rows, or raised the
alert itself. The other way round, a live process whose own alert stands while it judges
nothing more (its callers' connections went to another process) lets it go once the others
have judged ``hold_rows`` rows without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.gateway_claims import (
    judged_over,
    judged_since,
    orphaned,
    prior_rows,
)
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


@dataclass
class _Deployment:
    prior: PriorDetector | None = None
    model: str | None = None
    """The real model the prior detector judges (``name:version``)."""
    labels: list[int] = field(default_factory=list)
    """Real's predicted classes not yet judged (column indices; a binary model's 1 is its
    positive class)."""
    scheduled: bool = False
    last_run: float = 0.0
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Statistics of the alerts released since the last claim (for their clear events)."""
    changed: bool = False
    held: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Alerts adopted from a gateway process that stopped claiming them (by alert id)."""
    hold_until: int = 0
    """The prior's ``rows_seen`` at which the held alerts are released."""
    marks: dict[str, int] = field(default_factory=dict)
    marked_at: int = -1
    """While this process's own prior alert stands: the other live processes' judged rows
    when its detector last judged a row (at ``marked_at`` rows), to let the alert go once
    they judge ``hold_rows`` more without it and it judges none."""


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
        self._deps: dict[str, _Deployment] = {}
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
            record.deployment, _Deployment()
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

    def _schedule(self, deployment: str, dep: _Deployment) -> None:
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
                    self._note(dep, [alert] if what == "raised" else [],
                               [alert] if what == "cleared" else [])  # fmt: skip
                self._release_held(deployment, dep)
        except Exception:
            log.exception("online drift detectors of %s failed", deployment)
        if dep.changed and deployment not in self._publishing:
            self._spawn_publish(deployment)

    def _note(
        self, dep: _Deployment, raised: list[dict[str, Any]], cleared: list[dict[str, Any]]
    ) -> None:
        dep.figures.update(drift_claims.cleared_figures(cleared))
        if raised or cleared:
            dep.changed = True

    def _retry_log(self, deployment: str) -> RetryLog:
        found = self._retry_logs.get(deployment)
        if found is None:
            found = self._retry_logs[deployment] = RetryLog(
                log, f"online drift: writing the alerts of {deployment}"
            )
        return found

    def _active(self, dep: _Deployment) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = dict(dep.held)
        if dep.prior is not None and dep.prior.active is not None:
            out["prediction_prior"] = dep.prior.active
        return out

    # -- alerts of a process that died --------------------------------------------------------

    def _adopt(self, deployment: str, dep: _Deployment, claims: Mapping[str, Any]) -> None:
        """Hold the alerts of other gateway processes' claims that stopped being renewed, when
        they judged the model this process judges (its detector perhaps not made yet: they
        are then held until it has judged ``hold_rows``)."""
        if dep.model is None:
            return
        now_ms = time.time() * 1000
        for source, alerts in orphaned(claims, self.source, dep.model, now_ms,
                                       self.orphan_after_ms):  # fmt: skip
            new = {k: v for k, v in alerts.items() if k not in self._active(dep)}
            if new:
                dep.held.update(new)
                dep.hold_until = (dep.prior.rows_seen if dep.prior else 0) + self.hold_rows
                dep.changed = True
                log.info("online drift: %s: holding %s of %s, which stopped claiming, until "
                         "%d rows are judged here", deployment, ", ".join(sorted(new)), source,
                         self.hold_rows)  # fmt: skip

    def _let_go_for_others(self, deployment: str, dep: _Deployment,
                           claims: Mapping[str, Any]) -> None:  # fmt: skip
        """Let go of held alerts that a live gateway process judging the same model, with
        ``hold_rows`` rows judged, neither holds nor raises: a process that sees none of the
        deployment's traffic (one that adopted it idle) would otherwise hold them for good."""
        over, source, rows = judged_over(claims, self.source, dep.model, list(dep.held),
                                         time.time() * 1000, self.orphan_after_ms,
                                         self.hold_rows)  # fmt: skip
        if over:
            dep.figures.update(_released([dep.held.pop(a) for a in over], dep.prior))
            dep.changed = True
            log.info("online drift: %s: %s judged %d rows without %s: letting go", deployment,
                     source, rows, ", ".join(over))  # fmt: skip

    def _let_go_when_idle(self, deployment: str, dep: _Deployment,
                          claims: Mapping[str, Any]) -> None:  # fmt: skip
        """Let this process's own prior alert go once other live processes judging the same
        model have judged ``hold_rows`` rows without it while this one judged none: its
        detector is never fed again where its connections went elsewhere, and the alert stood
        for good (20,049 healthy rows judged by the other process; a helper's probe)."""
        prior = dep.prior
        if prior is None or prior.active is None:
            dep.marks, dep.marked_at = {}, -1
            return
        now_ms = time.time() * 1000
        if prior.rows_seen != dep.marked_at:  # it judged rows since: they decide, not others
            dep.marks = prior_rows(claims, self.source, dep.model, now_ms, self.orphan_after_ms)
            dep.marked_at = prior.rows_seen
            return
        judged = prior_rows(claims, self.source, dep.model, now_ms, self.orphan_after_ms)
        for source, seen in judged.items():
            if source not in dep.marks or seen < dep.marks[source]:  # new, or restarted:
                dep.marks[source] = seen  # counted from now
        found = judged_since(claims, judged, dep.marks, "prediction_prior", self.hold_rows)
        if found is None:
            return
        self._note(dep, [], [prior.release()])
        dep.marks, dep.marked_at = {}, -1
        log.info("online drift: %s: %s judged %d rows without prediction_prior while this "
                 "process judged none: letting its own go", deployment, *found)  # fmt: skip

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
            dep = self._deps.setdefault(deployment, _Deployment())
            self._new_model(deployment, dep, str(real))
            self._adopt(deployment, dep, claims)
            if dep.changed and deployment not in self._publishing:
                self._spawn_publish(deployment)

    def _release_held(self, deployment: str, dep: _Deployment) -> None:
        """Held alerts go once the detector has judged enough rows to say for itself (or
        holds the alert itself)."""
        if not dep.held or dep.prior is None:
            return
        if dep.prior.active is not None:
            dep.held.pop("prediction_prior", None)
        if dep.held and dep.prior.rows_seen >= dep.hold_until:
            dep.figures.update(_released(dep.held.values(), dep.prior))
            log.info("online drift: %s: %d rows judged, releasing %s", deployment,
                     dep.prior.rows_seen, ", ".join(sorted(dep.held)))  # fmt: skip
            dep.held = {}
            dep.changed = True

    def _new_model(self, deployment: str, dep: _Deployment, key: str) -> None:
        """A promotion (or the first record): the prior is judged against the new real's
        training scores, once they are known."""
        if dep.prior is not None and dep.prior.active is not None:
            dep.figures["prediction_prior"] = {"value": None, "threshold": None}
            dep.changed = True
        if dep.held:  # about the previous real model
            dep.figures.update(drift_claims.cleared_figures(dep.held.values()))
            dep.held, dep.changed = {}, True
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
            try:
                decided, claims = await drift_store.claim_and_read(
                    self.client,
                    deployment,
                    self.source,
                    self._active(dep),
                    stale_ms=self.stale_ms,
                    figures=figures,
                    extra=self._summary(dep),
                )
            except REDIS_FAILURES as exc:
                self._retry_log(deployment).failed(exc)
                dep.figures = {**figures, **dep.figures}
                dep.changed = True
                break
            self._retry_log(deployment).succeeded()
            events += decided
            self._adopt(deployment, dep, claims)
            self._let_go_for_others(deployment, dep, claims)
            self._let_go_when_idle(deployment, dep, claims)
            if not dep.changed:
                break
        announce(deployment, events)
        return events

    def _summary(self, dep: _Deployment) -> dict[str, Any]:
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


def _released(
    held: Iterable[dict[str, Any]], prior: PriorDetector | None
) -> dict[str, dict[str, Any]]:
    """The figures a held alert clears with: what this process's own detector reads now, not
    the dead process's figure from its raise (a clear said "0.0862 (threshold 0.6197)", as if
    the feed were still shifted; a helper's live check)."""
    figures = drift_claims.cleared_figures(held)
    if prior is not None and "prediction_prior" in figures and prior.rows_seen:
        now = prior.alert()
        figures["prediction_prior"] = {"value": now["value"], "threshold": now["threshold"]}
    return figures
