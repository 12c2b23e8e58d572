"""What ``/v1/deployments/{d}/drift`` shows, read from what the monitor and the online
detectors stored, and the deployment's alert thresholds (stored beside the report, partial
changes keeping the rest)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

from gateway.observability import drift_store
from rendezvous import drift_claims, names
from rendezvous.bus.connection import AsyncClient
from rendezvous.drift_alerts import NEWER_KINDS, Thresholds

log = logging.getLogger(__name__)

MONITOR = "monitor"
"""The monitor's source name in the shared alert list."""

AWAY_MS = 10_000
"""A source whose claim is older than this is shown ``away``: every source renews at least
every 3 s (a log bin with nothing to judge; a gateway every second), so it stopped or hung. Its
alerts stay until the claim goes stale (a gateway's 10 s, a log bin's 180 s, for its restart to
adopt them): ``away`` says why an alert outlives the process that raised it."""
GATEWAY_AWAY_MS = 3_000
"""A gateway process renews every second, and another adopts its claim past 3 s: away from
then (at 10 s, the stale bound, a dead gateway's claim was gone before it was ever shown away;
a helper's live check)."""


def thresholds_from(raw: bytes | None, defaults: Thresholds) -> Thresholds:
    if raw is None:
        return defaults
    try:
        return defaults.merged(json.loads(raw))
    except ValueError as exc:
        log.error("stored drift thresholds are invalid (%s); using the defaults", exc)
        return defaults


async def drift_view(
    client: AsyncClient,
    deployment: str,
    defaults: Thresholds,
    *,
    history: int = 360,
    events: int = 50,
    now_ms: float | None = None,
) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.get(names.drift_report_key(deployment))
    pipe.get(names.drift_thresholds_key(deployment))
    pipe.xrevrange(names.drift_history_stream(deployment), count=history)
    pipe.xrevrange(names.drift_events_stream(deployment), count=events)
    pipe.hgetall(names.drift_alerts_key(deployment))
    pipe.hgetall(names.drift_event_counts_key(deployment))
    pipe.hgetall(names.drift_claims_key(deployment))
    report_raw, thresholds_raw, points, event_entries, *merged = await pipe.execute()
    report: dict[str, Any] = json.loads(report_raw) if report_raw else {}
    shared = drift_store.parse(*merged)
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    online = {
        source: _online_entry(claim, now_ms, source.startswith(drift_claims.GATEWAY_SOURCE))
        for source, claim in sorted(shared["claims"].items())
        if source != MONITOR
    }
    return {
        "deployment": deployment,
        "evaluated_at_ms": report.get("evaluated_at_ms"),
        "window": report.get("window"),
        "thresholds": thresholds_from(thresholds_raw, defaults).to_dict(),
        "current": report.get("current"),
        "alerts": shared["alerts"],
        "event_counts": shared["event_counts"],
        "online": online,
        "events": [json.loads(f[b"e"]) for _id, f in reversed(event_entries)],
        "history": [json.loads(f[b"p"]) for _id, f in reversed(points)],
    }


def _online_entry(claim: Mapping[str, Any], now_ms: float, gateway: bool) -> dict[str, Any]:
    entry = {k: v for k, v in claim.items() if k != "figures"}
    ts_ms = claim.get("ts_ms")
    if isinstance(ts_ms, int | float):
        entry["renewed_ms_ago"] = max(0, round(now_ms - ts_ms))
        entry["away"] = now_ms - ts_ms > (GATEWAY_AWAY_MS if gateway else AWAY_MS)
    return entry


async def set_thresholds(
    client: AsyncClient,
    deployment: str,
    changes: Mapping[str, Any],
    defaults: Thresholds,
    window_requests: int,
) -> Thresholds:
    """Validate and store a deployment's thresholds (partial changes keep the rest). A
    ``min_requests`` beyond what the window holds (``window_requests``) is refused: drift
    would never be judged."""
    stored = cast(bytes | None, await client.get(names.drift_thresholds_key(deployment)))
    current = thresholds_from(stored, defaults)
    # null: back to the default (RDV_DRIFT_THRESHOLDS, else the built-in), the only way back
    # once a value was set
    default = defaults.to_dict()
    changes = {k: default.get(k, v) if v is None else v for k, v in changes.items()}
    updated = current.merged(changes)  # ValueError naming the key at fault
    if updated.min_requests > window_requests:
        raise ValueError(
            f"threshold 'min_requests' {updated.min_requests} is more than the drift window "
            f"holds ({window_requests} requests, RDV_DRIFT_WINDOW_REQUESTS): drift would never "
            "be judged"
        )
    stored_doc = updated.to_dict()
    for kind in NEWER_KINDS:  # an older process refuses the whole set for a key it lacks
        if stored_doc[kind] == default[kind]:
            del stored_doc[kind]
    await client.set(names.drift_thresholds_key(deployment), json.dumps(stored_doc))
    return updated
