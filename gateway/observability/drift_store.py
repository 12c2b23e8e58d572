"""The shared list of active drift alerts (``rendezvous.drift_claims``), on the gateway's async
client: a source's claim, and the read of the list for the report and the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rendezvous import drift_claims, names
from rendezvous.bus.connection import AsyncClient
from rendezvous.drift_claims import parse

__all__ = ["claim", "claim_and_read", "parse", "read"]


async def claim(
    client: AsyncClient,
    deployment: str,
    source: str,
    alerts: Mapping[str, Mapping[str, Any]] | None,
    *,
    stale_ms: float,
    figures: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    now_ms: float | None = None,
) -> list[dict[str, Any]]:
    """Say which alerts ``source`` holds now (None: only drop stale claims) and merge; returns
    the raise and clear events this call decided, in order (``drift_claims.merge_args``)."""
    args = drift_claims.merge_args(deployment, source, alerts, stale_ms=stale_ms,
                                   figures=figures, extra=extra, now_ms=now_ms)  # fmt: skip
    raw = await client.eval(drift_claims.MERGE, *args)  # type: ignore[misc]
    return drift_claims.events_of(raw)


async def claim_and_read(
    client: AsyncClient,
    deployment: str,
    source: str,
    alerts: Mapping[str, Mapping[str, Any]],
    *,
    stale_ms: float,
    figures: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    retire: Mapping[str, float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``claim``, and every fresh claim as it stands after the merge, in the same round trip
    (one hash tag): a source that looks at the others' claims (``OnlineDrift``) pays nothing
    more for it."""
    args = drift_claims.merge_args(deployment, source, alerts, stale_ms=stale_ms,
                                   figures=figures, extra=extra, retire=retire)  # fmt: skip
    pipe = client.pipeline(transaction=False)
    pipe.eval(drift_claims.MERGE, *args)
    pipe.hgetall(names.drift_claims_key(deployment))
    raw, claims_raw = await pipe.execute()
    return drift_claims.events_of(raw), parse({}, {}, claims_raw)["claims"]


async def read(client: AsyncClient, deployment: str) -> dict[str, Any]:
    """The active alerts (sorted by id), the raise counts by kind and the fresh claims."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(names.drift_alerts_key(deployment))
    pipe.hgetall(names.drift_event_counts_key(deployment))
    pipe.hgetall(names.drift_claims_key(deployment))
    alerts_raw, counts_raw, claims_raw = await pipe.execute()
    return parse(alerts_raw, counts_raw, claims_raw)
