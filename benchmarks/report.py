"""Figures from raw latencies and the gateway-to-baseline ratios (rendered by
``benchmarks.report_markdown``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.axes_report import axis_ratios

PERCENTILES = (50, 90, 99, 99.9)
HISTOGRAM_STEP = 1.1
"""Latency histogram buckets grow by 10 %: bucket k holds [0.01 ms * 1.1^k, 0.01 ms * 1.1^(k+1))."""

TARGETS = {
    "throughput_c64_vs_inprocess": (">=", 0.6),
    "throughput_c64_vs_peer": (">=", 5.0),
    "added_p50_ms_c1": ("<=", 0.7),
    "p99_c64_vs_inprocess": ("<=", 2.0),
    "rss_mb_total": ("<=", 600.0),
    "throughput_c64_cluster_vs_single": (">=", 0.8),
}
"""The issues' targets (2-core machine, ratios from the same run)."""

SYSTEM_TITLES = {
    "gateway": "rdv serve (gateway + Redis + real + canary + log bin)",
    "gateway-cluster": "rdv serve on a local Redis Cluster (3 masters, no replica)",
    "gateway-cluster-replicated": "rdv serve on a local Redis Cluster (3 masters + 3 replicas)",
    "inprocess": "in-process FastAPI + onnxruntime (2 uvicorn processes)",
    "mlserver": "MLServer + onnxruntime runtime",
}


def latency_figures(latencies_ms: Sequence[float]) -> dict[str, Any]:
    """Percentiles, mean, max, and a log-bucket histogram (the raw distribution, compactly)."""
    if not latencies_ms:
        return {"count": 0}
    a = np.asarray(latencies_ms, dtype=np.float64)
    out: dict[str, Any] = {"count": int(a.size)}
    for p in PERCENTILES:
        out[f"p{p:g}"] = round(float(np.percentile(a, p)), 4)
    out["mean"] = round(float(a.mean()), 4)
    out["min"] = round(float(a.min()), 4)
    out["max"] = round(float(a.max()), 4)
    buckets = np.floor(np.log(np.maximum(a, 0.01) / 0.01) / math.log(HISTOGRAM_STEP)).astype(int)
    keys, counts = np.unique(buckets, return_counts=True)
    out["histogram"] = {
        "first_bucket_ms": 0.01,
        "step": HISTOGRAM_STEP,
        "counts": {str(int(k)): int(c) for k, c in zip(keys, counts, strict=True)},
    }
    return out


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's figures over several rounds. Each load keeps the round with the median
    throughput, whole (its latencies, CPU and errors belong together), and lists every
    round's throughput and latencies beside it; memory is the largest peak of any round."""
    if len(runs) == 1:
        return runs[0]
    combined = dict(runs[0])
    combined["rounds"] = len(runs)
    combined["labels_agree_with_onnxruntime"] = all(
        r["labels_agree_with_onnxruntime"] for r in runs
    )
    combined["rss_mb"] = dict(max(runs, key=lambda r: r["rss_mb"]["peak_serving_total"])["rss_mb"])
    pss = [r["rss_mb"].get("peak_serving_pss") for r in runs]
    if None not in pss:
        combined["rss_mb"]["peak_serving_pss"] = max(pss)
    combined["phases"] = {}
    for label in runs[0]["phases"]:
        measured = [r["phases"][label] for r in runs if label in r["phases"]]
        median = dict(sorted(measured, key=lambda ph: ph["throughput_rps"])[len(measured) // 2])
        median["rounds"] = {
            "throughput_rps": [ph["throughput_rps"] for ph in measured],
            "p50_ms": [ph["latency_ms"].get("p50") for ph in measured],
            "p99_ms": [ph["latency_ms"].get("p99") for ph in measured],
            "errors": [ph["errors"] for ph in measured],
            "cpu_us_per_request": [ph.get("cpu_us_per_request") for ph in measured],
        }
        if any(ph.get("redis") for ph in measured):
            median["rounds"]["redis_commands_per_request"] = [
                (ph.get("redis") or {}).get("commands_per_request") for ph in measured
            ]
        combined["phases"][label] = median
    return combined


def all_errors(phase: dict[str, Any]) -> int:
    """Errors of every round of a load (a phase's own ``errors`` are its median round's)."""
    return sum(phase.get("rounds", {}).get("errors") or [phase["errors"]])


def _phase(results: dict[str, Any], system: str, load: str) -> dict[str, Any] | None:
    phase: dict[str, Any] | None = results.get("systems", {}).get(system, {}).get("phases", {})
    return phase.get(load) if phase else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratios(results: dict[str, Any], high_load: str = "c64", low_load: str = "c1") -> dict[str, Any]:
    """The issue's comparison figures; ``None`` where a system was not run."""
    gw_hi = _phase(results, "gateway", high_load)
    ip_hi = _phase(results, "inprocess", high_load)
    peer_hi = _phase(results, "mlserver", high_load)
    gw_lo = _phase(results, "gateway", low_load)
    ip_lo = _phase(results, "inprocess", low_load)

    def get(phase: dict[str, Any] | None, *path: str) -> float | None:
        value: Any = phase
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if value is not None else None

    added = None
    if gw_lo is not None and ip_lo is not None:
        g, i = get(gw_lo, "latency_ms", "p50"), get(ip_lo, "latency_ms", "p50")
        added = round(g - i, 4) if g is not None and i is not None else None
    rss = results.get("systems", {}).get("gateway", {}).get("rss_mb", {})
    out: dict[str, Any] = {
        **_paired(
            "throughput_c64_vs_inprocess",
            gw_hi,
            ip_hi,
            "throughput_rps",
            _ratio,
            _ratio(get(gw_hi, "throughput_rps"), get(ip_hi, "throughput_rps")),
        ),
        "throughput_c64_vs_peer": _ratio(
            get(gw_hi, "throughput_rps"), get(peer_hi, "throughput_rps")
        ),
        **_paired("added_p50_ms_c1", gw_lo, ip_lo, "p50_ms", _difference, added),
        **_paired(
            "p99_c64_vs_inprocess",
            gw_hi,
            ip_hi,
            "p99_ms",
            _ratio,
            _ratio(get(gw_hi, "latency_ms", "p99"), get(ip_hi, "latency_ms", "p99")),
        ),
        "rss_mb_total": rss.get("peak_serving_total"),
        "pss_mb_total": rss.get("peak_serving_pss"),
        **_cluster_figures(results, high_load),
    }
    out["targets"] = {
        key: {"op": op, "target": bound, "met": _met(out[key], op, bound)}
        for key, (op, bound) in TARGETS.items()
    }
    if "axes" in results:  # issue 18's axes ran (or were asked for): their keys beside
        axes = axis_ratios(results)
        out["targets"].update(axes.pop("targets"))
        out.update(axes)
    over = results.get("overload")
    if over:  # ``--overload``: figures without a target (a refusal should be immediate)
        out["refusal_p50_ms_overload"] = get(over, "refusal_latency_ms", "p50")
        out["refusal_p99_ms_overload"] = get(over, "refusal_latency_ms", "p99")
        out["refusal_share_overload"] = get(over, "refused_share")
        out["ok_p50_ms_overload"] = get(over, "latency_ms", "p50")
        out["ok_p99_ms_overload"] = get(over, "latency_ms", "p99")
        out["refusal_p50_vs_echo_overload"] = _ratio(
            out["refusal_p50_ms_overload"], get(over, "echo_reference", "latency_ms", "p50")
        )
    return out


def _cluster_figures(results: dict[str, Any], load: str) -> dict[str, Any]:
    """The cluster against the single node (issue 14): throughput at ``load``, the median of
    each round's own ratio (the two ran one after the other in every round, in alternating
    order), every round's ratio and the ratio of the two median rounds beside it; and Redis
    commands and bytes per answered request at ``load`` on each (summed over the masters).

    The target's figure is the cluster without replicas, like the single node it is set
    against: the comparison is of routing and partitioning. The replicated cluster's figures
    (``_cluster_replicated_``) say what replication costs when its six servers share the
    machine's two cores with everything else; on separate hosts that cost is not the
    gateway's."""
    single = _phase(results, "gateway", load)
    out: dict[str, Any] = {}
    for system, key in (("gateway-cluster", "cluster"),
                        ("gateway-cluster-replicated", "cluster_replicated")):  # fmt: skip
        cluster = _phase(results, system, load)
        figure = f"throughput_c64_{key}_vs_single"
        out[figure] = None
        if single and cluster:
            a = single.get("rounds", {}).get("throughput_rps") or [single["throughput_rps"]]
            b = cluster.get("rounds", {}).get("throughput_rps") or [cluster["throughput_rps"]]
            paired = [
                r for r in (_ratio(y, x) for x, y in zip(a, b, strict=False)) if r is not None
            ]
            if paired:
                out[figure] = round(float(np.median(paired)), 3)
            out[f"{figure}_rounds"] = paired
            out[f"{figure}_of_median_rounds"] = _ratio(
                cluster["throughput_rps"], single["throughput_rps"]
            )
        if cluster or key == "cluster":
            redis = (cluster or {}).get("redis") or {}
            out[f"redis_commands_per_request_{key}"] = redis.get("commands_per_request")
            out[f"redis_bytes_per_request_{key}"] = redis.get("bytes_per_request")
    if out["throughput_c64_cluster_replicated_vs_single"] is None:
        del out["throughput_c64_cluster_replicated_vs_single"]
    redis = (single or {}).get("redis") or {}
    out["redis_commands_per_request_single"] = redis.get("commands_per_request")
    out["redis_bytes_per_request_single"] = redis.get("bytes_per_request")
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _paired(
    figure: str,
    gateway: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    key: str,
    compare: Callable[[float | None, float | None], float | None],
    of_medians: float | None,
) -> dict[str, Any]:
    """The gateway against the in-process baseline: the median of each round's own comparison
    (the two ran one after the other in every round, in alternating order, so a slow spell of
    the host falls on both), every round's beside it (their spread is the noise), and the
    comparison of the two median-throughput rounds, which may come from different rounds (the
    figure until 2026-12-06: a fast round of the baseline beside a slow one of the gateway read
    as the gateway's cost). One round: that round's."""
    a = (gateway or {}).get("rounds", {}).get(key) or []
    b = (baseline or {}).get("rounds", {}).get(key) or []
    rounds = [r for r in (compare(x, y) for x, y in zip(a, b, strict=False)) if r is not None]
    if len(rounds) < 2 or len(a) != len(b):
        return {figure: of_medians}
    return {figure: round(float(np.median(rounds)), 4), f"{figure}_rounds": rounds,
            f"{figure}_of_median_rounds": of_medians}  # fmt: skip


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound
