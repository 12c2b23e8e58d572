"""The feature detectors, run in the log bin on every request's rows, in the bin's own batches.

Why here and not in the gateway: the log bin already reads and decodes every request's envelope
(features included), in batches of up to hundreds, one process for all of a deployment's
traffic. In the gateway the same detectors cost ~14.5 µs a request on the request path, and
each gateway process judged only the rows it served, so a window of 400 rows filled at half
speed with two processes. Here they add no work to the request path, judge all the traffic, and
cost a vectorised step per ``JUDGE_ROWS`` rows (or ``JUDGE_WAIT_S``).

What they find goes to the shared alert list (``rendezvous.drift_claims``) as this consumer's
claim (``logbin:<consumer>``), queued into the log bin's ack pipeline: at once when an alert
was raised or cleared, else every ``publish_s`` to renew it (an idle bin writes it alone). The
same round trip reads whether the prediction-prior alert (the gateways' detector) is active: a
class-prior shift moves many features a little, and the long windows that alerted during one
start afresh when it ends (``FeatureDetectors.end_episode``). The events this consumer's claims
decide are logged here and relayed to the webhooks by the gateway that leads the deployment's
drift evaluation (the log bin has no HTTP client).

Several log-bin consumers in one group each judge the share of the traffic they read (the
detectors are calibrated per detector, so each keeps its false-alarm budget; a fault in every
row is seen by each, only more slowly); their claims merge into one list, where an alert is
active while any consumer holds it.

Nothing here may stop the archive: every failure is logged and the rows are dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rendezvous import drift_claims, names
from rendezvous.bus.routing import Command, command
from rendezvous.drift_detect import FeatureDetectors
from rendezvous.drift_profile import FeatureProfile
from rendezvous.drift_settings import GROSS_KINDS, WINDOW_KINDS, DetectorSettings
from rendezvous.envelope import RequestEnvelope
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

PRIOR = "prediction_prior"
"""The alert id of the gateways' prediction-prior detector."""
PRIOR_B = PRIOR.encode()
_MERGE = drift_claims.MERGE.encode()
CLAIM_STALE_S = 180.0
"""How long a log bin's claim outlives its last renewal. Its alerts are a feed's state that
only a log bin judges: one dead or hung past 10 s (the bound of the other sources) cleared
them, a "resolved" to the webhooks for a feed still broken, and its restart (which adopts its
own claim, ``adopt``) found nothing to hold and said "firing" again rows later. 180 s outlasts
a hang the supervisor's watchdog ends (``RDV_WATCHDOG_S``, 120 s) and a restart; a bin gone for
good lets its alerts go then, unless another bin holds them."""
IDLE_RENEW_S = 3.0
"""How often the claim of a deployment with nothing judged is renewed."""
MAX_PENDING_ROWS = 20_000
"""Rows waiting for the detectors at most; beyond, new rows are left out (counted)."""
JUDGE_ROWS = 128
"""A busy bin steps the detectors once this many rows are kept: a step's cost is mostly fixed
up to about a hundred rows (16 rows: 13 us a row; 64: 6.7-11.8 on a slow day; 128: 4.5-5.9;
256: 3.9-4.3). 128 keeps the delay it adds to a detection within 128 rows (or
``JUDGE_WAIT_S``)."""
JUDGE_WAIT_S = 0.25
"""...or once the oldest kept row waited this long (an idle read judges whatever is kept)."""


@dataclass
class _Deployment:
    spec: FeatureSpec
    detectors: FeatureDetectors | None
    rows: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    kept_since_s: float = 0.0
    """When the oldest kept row came (monotonic)."""
    dropped: int = 0
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Statistics of the alerts released since the last claim (for their clear events)."""
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The figures of the claim in flight (given back if it fails)."""
    changed: bool = True
    next_claim_s: float = 0.0
    prior_active: bool = False
    judged: bool = False
    """Rows were judged since the last claim (else the claim is only kept fresh)."""
    held: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Alerts this source claimed before this process started (``adopt``), held until the
    fresh detectors have judged enough rows to say for themselves (range alerts are not held:
    the detectors took them)."""


class FeatureWatch:
    def __init__(
        self,
        consumer: str,
        *,
        settings: DetectorSettings | None = None,
        publish_s: float = 1.0,
        stale_s: float = CLAIM_STALE_S,
    ):
        self.source = drift_claims.LOGBIN_SOURCE + consumer
        self.settings = settings or DetectorSettings()
        self.publish_s = publish_s
        self.stale_ms = stale_s * 1000
        self.hold_rows = self.settings.drift_window
        """Rows after which an adopted alert the detectors did not raise again is released:
        their longest window's (every detector has judged a full window by then). Not a range
        alert: the detectors take those as their own (``adopt``)."""
        self._deps: dict[str, _Deployment] = {}

    # -- what is watched ----------------------------------------------------------------------

    def follow(self, specs: Mapping[str, FeatureSpec]) -> list[str]:
        """The deployments to watch and their feature specs (the log bin's refresh); returns
        those new here, for ``adopt``. A changed spec means new training statistics: what the
        old detectors held is void."""
        for name in [n for n in self._deps if n not in specs]:
            del self._deps[name]
        new = []
        for name, spec in specs.items():
            dep = self._deps.get(name)
            if dep is None:
                self._deps[name] = _Deployment(spec, self._detectors(name, spec))
                new.append(name)
            elif spec.version != dep.spec.version or spec.to_dict() != dep.spec.to_dict():
                old = dep.detectors
                dep.spec, dep.detectors = spec, self._detectors(name, spec)
                dep.rows, dep.pending_rows, dep.held = [], 0, {}
                for alert_id, alert in (old.active if old is not None else {}).items():
                    dep.figures[alert_id] = {"value": alert.get("value"), "threshold": None}
                    dep.changed = True
        return new

    def adopt(self, deployment: str, claim: bytes | str | None) -> None:
        """What this source claimed before this process started (a restarted bin keeps its
        consumer name). Its ``feature_range`` alerts are taken into the fresh detectors as
        their own (``FeatureDetectors.inherit``): each clears once they judge the feed back in
        range (about 175 rows) and stands while it is not. The others are held until the
        detectors have judged ``hold_rows`` rows, or cleared one themselves (a feature's window
        alerts also go when its gross alert clears: its windows start afresh, as with the
        detectors' own). A restart then says nothing to the webhooks: the detectors start
        empty, and their first claim released every alert (a "resolved" for a feed still
        broken, and a "firing" again rows later)."""
        dep = self._deps.get(deployment)
        if dep is None or dep.detectors is None or not claim:
            return
        try:
            alerts = json.loads(claim).get("alerts") or {}
        except (ValueError, AttributeError):
            return
        held = {k: v for k, v in alerts.items() if isinstance(v, dict)}
        taken = dep.detectors.inherit(held)
        dep.held = {k: v for k, v in held.items() if k not in taken}
        if taken:
            log.info("feature watch: %s: %d range alerts of the last run judged afresh: %s",
                     deployment, len(taken), ", ".join(sorted(taken)))  # fmt: skip
        if dep.held:
            log.info("feature watch: %s: holding %d alerts of the last run until %d rows are "
                     "judged: %s", deployment, len(dep.held), self.hold_rows,
                     ", ".join(sorted(dep.held)))  # fmt: skip

    def _detectors(self, deployment: str, spec: FeatureSpec) -> FeatureDetectors | None:
        try:
            profile = FeatureProfile.from_spec(spec)
        except Exception:
            log.exception("feature watch: no training profile for %s", deployment)
            return None
        return FeatureDetectors(profile, self.settings) if profile is not None else None

    def rows_seen(self, deployment: str) -> int:
        dep = self._deps.get(deployment)
        return dep.detectors.rows_seen if dep is not None and dep.detectors is not None else 0

    # -- judging --------------------------------------------------------------------------

    def observe(self, deployment: str, env: RequestEnvelope, now_s: float | None = None) -> None:
        """Keep a request's rows for the next ``judge`` (rows of another spec are left out)."""
        dep = self._deps.get(deployment)
        if dep is None or dep.detectors is None:
            return
        x = env.features
        if env.spec_version != dep.spec.version or x.ndim != 2 or x.shape[1] != dep.spec.width:
            return
        if dep.pending_rows >= MAX_PENDING_ROWS:
            dep.dropped += len(x)
            return
        if not dep.rows:
            dep.kept_since_s = time.monotonic() if now_s is None else now_s
        dep.rows.append(x)
        dep.pending_rows += len(x)

    def judge(self, *, due_only: bool = False, now_s: float | None = None) -> None:
        """Hand the kept rows to the detectors, one vectorised step per deployment; with
        ``due_only``, only where ``JUDGE_ROWS`` rows are kept or the oldest waited
        ``JUDGE_WAIT_S`` (a step's cost is mostly fixed, and a busy bin's batches are small)."""
        now_s = time.monotonic() if now_s is None else now_s
        for name, dep in self._deps.items():
            if not dep.rows or dep.detectors is None:
                continue
            if (
                due_only
                and dep.pending_rows < JUDGE_ROWS
                and now_s - dep.kept_since_s < JUDGE_WAIT_S
            ):
                continue
            rows, dep.rows, dep.pending_rows = dep.rows, [], 0
            dep.judged = True
            try:
                raised, cleared = dep.detectors.update(np.concatenate(rows))
            except Exception:
                log.exception("feature watch: the detectors of %s failed", name)
                continue
            self._note(dep, raised, cleared)
            if dep.held and dep.detectors.rows_seen >= self.hold_rows:
                # judged enough: what they did not raise clears, at the figures they read now
                # (the last run's, from its raise, said "1 (threshold 0.5)" for a feature no
                # longer stuck: a helper's live check)
                # A window alert becomes theirs, its alarm standing: it clears when their full
                # windows fall under the clear level, and stands while a subtle shift lasts.
                force = dep.detectors.rows_seen >= 3 * self.hold_rows  # no hold for good
                taken = dep.detectors.inherit_windows(dep.held, force=force)
                for alert_id in taken:
                    dep.held.pop(alert_id)
                if taken:  # judged on their full windows at once
                    self._note(dep, *dep.detectors.check_now())
                left = {k: v for k, v in dep.held.items() if k.split("/", 1)[0] in WINDOW_KINDS}
                gone = {k: v for k, v in dep.held.items() if k not in left}
                if gone:
                    dep.figures.update(dep.detectors.figures_now(gone))
                    dep.changed = True
                dep.held = left

    @staticmethod
    def _note(
        dep: _Deployment, raised: list[dict[str, Any]], cleared: list[dict[str, Any]]
    ) -> None:
        released = drift_claims.cleared_figures(cleared)
        dep.figures.update(released)
        for alert_id in released:  # the fresh detectors' own evidence
            # ...but a window alert they raised and cleared on windows not yet full is no
            # evidence against the last run's (a subtle shift flapped there: a "resolved" and
            # a "firing" again); it is held until their windows are full (``judge``)
            if alert_id.split("/", 1)[0] not in WINDOW_KINDS:
                dep.held.pop(alert_id, None)
        # A gross alert cleared: the feature's windows started afresh, and a held window
        # alert of it goes with them, as the detectors' own do (it was about rows before).
        gone = {a.get("feature") for a in cleared if a.get("kind") in GROSS_KINDS}
        ties = [f"{w}/{f}" for f in gone for w in WINDOW_KINDS if f"{w}/{f}" in dep.held]
        if ties and dep.detectors is not None:
            dep.figures.update(dep.detectors.figures_now({k: dep.held.pop(k) for k in ties}))
        if raised or cleared:
            dep.changed = True

    # -- telling --------------------------------------------------------------------------

    def due(self, now_s: float | None = None) -> bool:
        now_s = time.monotonic() if now_s is None else now_s
        return any(d.changed or now_s >= d.next_claim_s for d in self._deps.values())

    def queue(self, commands: list[Command], now_s: float | None = None) -> list[str]:
        """Add the claims that are due (changed, or ``publish_s`` old) to ``commands``, each
        with a read of the prediction-prior alert: two commands a deployment, in its hash
        slot. Returns the deployments queued, for ``replies``."""
        now_s = time.monotonic() if now_s is None else now_s
        queued = []
        for name, dep in self._deps.items():
            if not (dep.changed or now_s >= dep.next_claim_s):
                continue
            # An idle deployment's claim is only kept fresh (well inside ``stale_s``): twenty
            # of them claimed every second were most of an idle log bin's Redis commands.
            idle_s = min(IDLE_RENEW_S, self.stale_ms / 3000)
            every_s = self.publish_s if dep.judged else max(self.publish_s, idle_s)
            dep.changed, dep.judged, dep.next_claim_s = False, False, now_s + every_s
            figures, dep.figures = dep.figures, {}
            dep.sent = figures
            active = dict(dep.detectors.active) if dep.detectors is not None else {}
            for alert_id, alert in dep.held.items():
                active.setdefault(alert_id, alert)
            try:
                args = drift_claims.merge_args(
                    name,
                    self.source,
                    active,
                    stale_ms=self.stale_ms,
                    figures=figures,
                    extra=self._summary(dep),
                )
            except Exception:
                log.exception("feature watch: cannot state the alerts of %s", name)
                continue
            raw = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            commands.append(command(b"EVAL", _MERGE, *raw, key_at=3))  # args: numkeys, keys...
            commands.append(command(b"HEXISTS", names.drift_alerts_key(name).encode(), PRIOR_B))
            queued.append(name)
        return queued

    def unsent(self, queued: Sequence[str]) -> None:
        """The pipeline that carried these claims failed as a whole: they are said again
        within ``publish_s``, with the figures of the alerts they released."""
        for name in queued:
            if name in self._deps:
                self._retry(self._deps[name])

    def _retry(self, dep: _Deployment) -> None:
        """Again within ``publish_s`` (not at every batch: a refusal may last)."""
        dep.figures, dep.sent = {**dep.sent, **dep.figures}, {}
        dep.next_claim_s = min(dep.next_claim_s, time.monotonic() + self.publish_s)

    def replies(self, queued: Sequence[str], replies: Sequence[Any]) -> None:
        """Act on the replies of what ``queue`` queued (the pipeline's last ``2 * len(queued)``
        replies, errors as exception values): log the events decided, follow the prior."""
        for i, name in enumerate(queued):
            dep = self._deps.get(name)
            if dep is None:
                continue
            events_raw, prior = replies[2 * i], replies[2 * i + 1]
            if isinstance(events_raw, Exception):
                log.warning("feature watch: cannot write the alerts of %s: %s", name, events_raw)
                self._retry(dep)
                continue
            dep.sent = {}
            for event in drift_claims.events_of(events_raw):
                log.warning("%s", drift_claims.event_line(name, event))
            if isinstance(prior, Exception) or dep.detectors is None:
                continue
            was, dep.prior_active = dep.prior_active, bool(prior)
            dep.detectors.external_episode = dep.prior_active
            if was and not dep.prior_active:
                self._note(dep, [], dep.detectors.end_episode())

    def _summary(self, dep: _Deployment) -> dict[str, Any]:
        doc: dict[str, Any] = {"spec": dep.spec.version, "dropped_rows": dep.dropped}
        if dep.detectors is not None:
            doc["rows"] = dep.detectors.rows_seen
            doc["features"] = dep.detectors.summary()
        return doc
