"""What the other gateway processes' drift claims say of the prediction prior, read by one
(``drift_online``): which stopped being renewed (their process died) while holding an alert,
and which, alive, judged enough rows to say an alert held here is over. Pure: the claims come
as ``drift_store`` parses them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rendezvous import drift_claims


def _gateway_claims(
    claims: Mapping[str, Any], own: str, model: str | None
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(source, claim) of every other gateway process judging ``model``."""
    for source, claim in claims.items():
        if source == own or not source.startswith(drift_claims.GATEWAY_SOURCE):
            continue
        if isinstance(claim, Mapping) and claim.get("model") == model:
            yield source, claim


def _age_ms(claim: Mapping[str, Any], now_ms: float) -> float:
    return now_ms - float(claim.get("ts_ms", now_ms))


def orphaned(
    claims: Mapping[str, Any], own: str, model: str | None, now_ms: float, after_ms: float
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, its alerts) of each claim on ``model`` not renewed for ``after_ms``."""
    for source, claim in _gateway_claims(claims, own, model):
        alerts = claim.get("alerts")
        if _age_ms(claim, now_ms) >= after_ms and isinstance(alerts, dict) and alerts:
            yield source, {k: v for k, v in alerts.items() if isinstance(v, dict)}


def prior_rows(
    claims: Mapping[str, Any], own: str, model: str | None, now_ms: float, after_ms: float
) -> dict[str, int]:
    """Rows each other live gateway process judging ``model`` has judged, by source."""
    out: dict[str, int] = {}
    for source, claim in _gateway_claims(claims, own, model):
        prior = claim.get("prior")
        seen = prior.get("rows") if isinstance(prior, dict) else None
        if _age_ms(claim, now_ms) < after_ms and isinstance(seen, int | float):
            out[source] = int(seen)
    return out


def judged_since(
    claims: Mapping[str, Any],
    judged: Mapping[str, int],
    marks: Mapping[str, int],
    alert: str,
    rows: int,
) -> tuple[str, int] | None:
    """Of the live claims' rows judged (``prior_rows``), one that has judged ``rows`` rows
    since ``marks`` (its rows then) and neither raises nor holds ``alert``: its source and
    those rows (None when none)."""
    for source, seen in judged.items():
        claim = claims[source]
        kept = claim.get("held")
        holding = kept.get("alerts", []) if isinstance(kept, dict) else []
        since = seen - marks.get(source, seen)
        if since >= rows and alert not in (claim.get("alerts") or {}) and alert not in holding:
            return source, since
    return None


def judged_over(
    claims: Mapping[str, Any],
    own: str,
    model: str | None,
    held: list[str],
    now_ms: float,
    after_ms: float,
    rows: int,
) -> tuple[list[str], str, int]:
    """The alerts of ``held`` that a live claim on ``model``, with ``rows`` rows judged,
    neither raises nor holds; its source and rows ([] when none)."""
    for source, claim in _gateway_claims(claims, own, model):
        prior, alerts, kept = claim.get("prior"), claim.get("alerts") or {}, claim.get("held")
        seen = prior.get("rows") if isinstance(prior, dict) else None
        if _age_ms(claim, now_ms) >= after_ms or not isinstance(seen, int | float):
            continue
        holding = kept.get("alerts", []) if isinstance(kept, dict) else []
        over = [a for a in held if a not in alerts and a not in holding]
        if seen >= rows and over:
            return over, source, int(seen)
    return [], "", 0
