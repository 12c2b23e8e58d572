"""The prediction prior's alert handed between gateway processes, so that it outlives the
process that raised it (``drift_online``'s docstring tells why).

A process that judges the same real model adopts the prior alert of a gateway claim no longer
renewed and holds it; once it judges rows, its detector takes the alert as its own, which clears
when the detector judges the feed healthy. A held alert that another live process has judged
``hold_rows`` rows without is let go (the holder may see none of the traffic). The other way
round, a live process whose own alert stands while it judges nothing more lets it go once the
others have judged ``hold_rows`` rows without it. Each decision reads the claims that
``drift_online`` has just written and read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.observability.gateway_claims import (
    judged_over,
    judged_since,
    orphaned,
    prior_rows,
)
from rendezvous import drift_claims
from rendezvous.drift_prior import PriorDetector

log = logging.getLogger(__name__)


@dataclass
class DeploymentPrior:
    """One deployment's prior as this process judges it: its detector, the labels waiting for
    it, and the alerts held for processes that stopped."""

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
    adopted: dict[str, float] = field(default_factory=dict)
    """The dead claims whose alerts were adopted here (source -> the claim's ``ts_ms``): a claim
    is adopted once. Adopted again each time this process's detector cleared the alert it took
    over, it stood until the dead claim went stale (10 s: about 1,400 requests at 100/s), and
    adopted then let go for another process in one claim's loop, it spun (a helper's probe)."""
    held_from: dict[str, float] = field(default_factory=dict)
    """The dead claims the held alerts came from."""
    inherited_from: dict[str, float] = field(default_factory=dict)
    """The dead claims whose prior alert this process's detector took over: dropped from the
    claims (``retire``) once the detector clears it, so that they hold it no longer."""
    retire: dict[str, float] = field(default_factory=dict)
    """Dead claims to drop with the next claim."""

    def forget_held(self) -> None:
        self.held, self.held_from, self.inherited_from = {}, {}, {}

    def note(self, raised: list[dict[str, Any]], cleared: list[dict[str, Any]]) -> None:
        self.figures.update(drift_claims.cleared_figures(cleared))
        if raised or cleared:
            self.changed = True

    def active(self) -> dict[str, dict[str, Any]]:
        """The alerts this process claims: its own prior's and those it holds."""
        out: dict[str, dict[str, Any]] = dict(self.held)
        if self.prior is not None and self.prior.active is not None:
            out["prediction_prior"] = self.prior.active
        return out


@dataclass
class Handover:
    source: str
    """This process's claim (``gateway:<instance>``)."""
    orphan_after_ms: float
    """A gateway claim not renewed for this long is a dead process's."""
    hold_rows: int

    def adopt(self, deployment: str, dep: DeploymentPrior, claims: Mapping[str, Any]) -> None:
        """Hold the alerts of other gateway processes' claims that stopped being renewed, when
        they judged the model this process judges (its detector perhaps not made yet: they
        are then held until it has judged ``hold_rows``)."""
        if dep.model is None:
            return
        for gone in [s for s in dep.adopted if s not in claims]:  # dropped: stale or retired
            del dep.adopted[gone]
        now_ms = time.time() * 1000
        for source, alerts in orphaned(claims, self.source, dep.model, now_ms,
                                       self.orphan_after_ms):  # fmt: skip
            ts = float(claims[source].get("ts_ms", 0))
            if dep.adopted.get(source) == ts:
                continue  # taken over once already
            dep.adopted[source] = ts
            new = {k: v for k, v in alerts.items() if k not in dep.active()}
            own = dep.prior is not None and dep.prior.active is not None
            if own and "prediction_prior" in alerts:  # its own stands: the dead claim goes
                dep.inherited_from[source] = ts  # when it clears
            if new:
                dep.held.update(new)
                dep.held_from[source] = ts
                dep.hold_until = (dep.prior.rows_seen if dep.prior else 0) + self.hold_rows
                dep.changed = True
                log.info("online drift: %s: holding %s of %s, which stopped claiming",
                         deployment, ", ".join(sorted(new)), source)  # fmt: skip

    def let_go_for_others(self, deployment: str, dep: DeploymentPrior,
                          claims: Mapping[str, Any]) -> None:  # fmt: skip
        """Let go of held alerts that a live gateway process judging the same model, with
        ``hold_rows`` rows judged, neither holds nor raises: a process that sees none of the
        deployment's traffic (one that adopted it idle) would otherwise hold them for good."""
        over, source, rows = judged_over(claims, self.source, dep.model, list(dep.held),
                                         time.time() * 1000, self.orphan_after_ms,
                                         self.hold_rows)  # fmt: skip
        if over:
            dep.figures.update(released([dep.held.pop(a) for a in over], dep.prior))
            if not dep.held:
                dep.held_from = {}
            dep.changed = True
            log.info("online drift: %s: %s judged %d rows without %s: letting go", deployment,
                     source, rows, ", ".join(over))  # fmt: skip

    def let_go_when_idle(self, deployment: str, dep: DeploymentPrior,
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
        dep.note([], [prior.release()])
        dep.marks, dep.marked_at = {}, -1
        log.info("online drift: %s: %s judged %d rows without prediction_prior while this "
                 "process judged none: letting its own go", deployment, *found)  # fmt: skip

    def release_held(self, deployment: str, dep: DeploymentPrior) -> None:
        """After the detector judged rows: a held prior alert becomes its own (it then clears on
        the detector's evidence, or stands); any other held alert goes once the detector has
        judged ``hold_rows`` rows."""
        if not dep.held or dep.prior is None:
            return
        held = dep.held.get("prediction_prior")
        if held is not None and dep.prior.enabled:
            del dep.held["prediction_prior"]
            dep.inherited_from.update(dep.held_from)
            if dep.prior.active is None:
                dep.prior.inherit(held)
                log.info("online drift: %s: prediction_prior taken over; it clears once this "
                         "process's detector judges the feed healthy", deployment)  # fmt: skip
        if dep.held and dep.prior.rows_seen >= dep.hold_until:
            dep.figures.update(released(dep.held.values(), dep.prior))
            log.info("online drift: %s: %d rows judged, releasing %s", deployment,
                     dep.prior.rows_seen, ", ".join(sorted(dep.held)))  # fmt: skip
            dep.held, dep.held_from = {}, {}
            dep.changed = True

    @staticmethod
    def cleared_own(dep: DeploymentPrior) -> None:
        """This process's detector cleared the prior alert on its evidence: the dead claims it
        took over are dropped, or they would hold the alert until they went stale."""
        if dep.inherited_from:
            dep.retire.update(dep.inherited_from)
            dep.inherited_from = {}
            dep.changed = True


def released(
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
