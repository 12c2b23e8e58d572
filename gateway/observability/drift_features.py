"""The feature view: one feature's live distribution against training, and its
out-of-distribution rate over time (``GET /v1/deployments/{d}/drift/features``, the dashboard's
feature section).

The drift monitor already merges a window of sketches per evaluation; it hands that window
here and this module stores what the view needs beside the report, in the same pipeline: the
window's rows per feature and training bin and outside the training range (one key,
overwritten), and a point per feature of out-of-range rate and PSI next to each point of the
report's history (a capped stream). Reading the view is one pipelined round trip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.drift import Sketch
from rendezvous.drift_reference import FeatureReference
from rendezvous.spec import FeatureSpec

POINT_FIELD = b"p"


class UnknownFeature(LookupError):
    """A feature the deployment's spec does not name."""


def _rate(count: int, rows: int) -> float | None:
    return round(count / rows, 6) if rows else None


def snapshot(
    window: Sketch, reference: FeatureReference | None, now_ms: float
) -> dict[str, Any] | None:
    """The window's per-feature counts, when they were built against ``reference``."""
    counts = window.features
    if reference is None or counts is None or window.feature_version != reference.version:
        return None
    if counts.shape != reference.expected.shape:
        return None
    out = window.out_of_range
    if out is None or len(out) != len(reference.names):
        out = counts[:, 0] * 0
    return {
        "ts_ms": now_ms,
        "feature_version": reference.version,
        "rows": window.feature_rows,
        "ood_rows": window.ood_rows,
        "counts": counts.tolist(),
        "out_of_range": out.tolist(),
        "from_ms": window.start_ms,
        "to_ms": window.end_ms,
    }


def point(shot: Mapping[str, Any], psi: Mapping[str, float], spec: FeatureSpec) -> dict[str, Any]:
    """One point of the feature history: per feature (in spec order) the window's share of
    rows outside the training range and its PSI; the share of rows with any feature outside."""
    rows = int(shot["rows"])
    return {
        "ts_ms": shot["ts_ms"],
        "rows": rows,
        "ood_rate": _rate(int(shot["ood_rows"]), rows),
        "out_of_range": [_rate(int(n), rows) for n in shot["out_of_range"]],
        "psi": [psi.get(n) for n in spec.names],
    }


def store(
    pipe: Any,
    deployment: str,
    shot: dict[str, Any] | None,
    psi: Mapping[str, float],
    spec: FeatureSpec,
    history_len: int | None,
) -> None:
    """Queue the writes on the monitor's pipeline (keys of the deployment's slot); ``history_len``
    None: no history point this time."""
    if shot is None:
        return
    # this evaluation's PSI beside its counts: the view ranks and shows what /drift says now,
    # not the latest history point (written every few seconds at most)
    current = {**shot, "psi": [psi.get(n) for n in spec.names]}
    pipe.set(names.drift_features_key(deployment), json.dumps(current))
    if history_len is not None:
        pipe.xadd(
            names.drift_feature_history_stream(deployment),
            {POINT_FIELD: json.dumps(point(shot, psi, spec))},
            maxlen=history_len,
            approximate=False,
        )


def _training(spec: FeatureSpec, reference: FeatureReference | None, f: int) -> dict[str, Any]:
    stats = spec.stats.get(spec.names[f])
    if stats is None or reference is None:
        return {"stats": stats.to_dict() if stats else None, "edges": None, "shares": None}
    cuts = [float(c) for c in reference.cuts[f]]
    return {
        "stats": stats.to_dict(),
        # bin j holds values from edges[j] to edges[j + 1]; the end bins reach past the
        # training range, where the live rows outside it are counted too
        "edges": [stats.min, *cuts, stats.max],
        "shares": [round(float(v), 6) for v in reference.expected[f]],
    }


def view(
    spec: FeatureSpec,
    reference: FeatureReference | None,
    feature: str | None,
    shot_raw: bytes | None,
    points_raw: list[Any],
) -> dict[str, Any]:
    """The route's answer from what was read; ``feature`` None picks the feature with the
    highest PSI of the latest evaluation (else the first). Every feature's PSI and share out of
    range are the latest evaluation's, as ``/drift`` reports them; a snapshot written before
    it carried its PSI falls back to the latest history point."""
    shot: dict[str, Any] | None = json.loads(shot_raw) if shot_raw else None
    if shot is not None and (reference is None or shot.get("feature_version") != reference.version):
        shot = None  # counted against other training statistics: meaningless here
    points = [json.loads(fields[POINT_FIELD]) for _id, fields in reversed(points_raw)]
    points = [p for p in points if len(p.get("psi") or ()) == spec.width]
    latest = points[-1] if points else None
    if shot is not None and len(shot.get("psi") or ()) == spec.width and shot["rows"]:
        rows = int(shot["rows"])
        latest = {"psi": shot["psi"],
                  "out_of_range": [_rate(int(n), rows) for n in shot["out_of_range"]]}  # fmt: skip
    summary: list[dict[str, Any]] = []
    for f, name in enumerate(spec.names):
        summary.append({
            "feature": name,
            "psi": latest["psi"][f] if latest else None,
            "out_of_range_rate": latest["out_of_range"][f] if latest else None,
        })  # fmt: skip
    if feature is None:
        ranked = [(s["psi"], s["feature"]) for s in summary if isinstance(s["psi"], int | float)]
        feature = str(max(ranked)[1]) if ranked else spec.names[0]
    elif feature not in spec.names:
        raise UnknownFeature(f"feature {feature[:100]!r} is not in the deployment's feature spec")
    f = spec.names.index(feature)
    live = None
    if shot is not None and shot["rows"]:
        counts = shot["counts"][f]
        total = sum(counts)
        outside = int(shot["out_of_range"][f])
        live = {
            "rows": shot["rows"],
            "counts": counts,
            "shares": [round(c / total, 6) for c in counts] if total else None,
            "out_of_range_rows": outside,
            "out_of_range_rate": _rate(outside, int(shot["rows"])),
            "from_ms": shot.get("from_ms"),
            "to_ms": shot.get("to_ms"),
        }
    return {
        "feature": feature,
        "evaluated_at_ms": shot["ts_ms"] if shot else None,
        "training": _training(spec, reference, f),
        "live": live,
        "history": [
            {
                "ts_ms": p["ts_ms"],
                "rows": p["rows"],
                "out_of_range_rate": p["out_of_range"][f],
                "ood_rate": p["ood_rate"],
                "psi": p["psi"][f],
            }
            for p in points
        ],
        "features": summary,
    }


async def read_view(
    client: AsyncClient,
    deployment: str,
    spec: FeatureSpec,
    reference: FeatureReference | None,
    feature: str | None,
    history: int,
) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.get(names.drift_features_key(deployment))
    pipe.xrevrange(names.drift_feature_history_stream(deployment), count=history)
    shot_raw, points_raw = await pipe.execute()
    doc = view(spec, reference, feature, shot_raw, points_raw)
    return {"deployment": deployment, **doc}
