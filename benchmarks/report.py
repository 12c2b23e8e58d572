"""Figures from raw latencies, the gateway-to-baseline ratios, and the markdown table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.axes_report import DIGITS, axis_ratios, markdown_lines, summary_note

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


def _all_errors(phase: dict[str, Any]) -> int:
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
        "throughput_c64_vs_inprocess": _ratio(
            get(gw_hi, "throughput_rps"), get(ip_hi, "throughput_rps")
        ),
        "throughput_c64_vs_peer": _ratio(
            get(gw_hi, "throughput_rps"), get(peer_hi, "throughput_rps")
        ),
        "added_p50_ms_c1": added,
        "p99_c64_vs_inprocess": _ratio(
            get(gw_hi, "latency_ms", "p99"), get(ip_hi, "latency_ms", "p99")
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


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_markdown(results: dict[str, Any]) -> str:
    """The short form for the README: one row per system, then the ratios."""
    m = results["machine"]
    lines = [
        f"{results['date']}, commit `{results['commit']}`, {m['cpus']} x "
        f"{m['cpu_model'] or 'CPU'}, {results['config']['duration']:g} s per load"
        f"{_rounds_text(results)}.",
        "",
        "| system | c1 p50 ms | c64 req/s | c64 p50 ms | c64 p99 ms | CPU µs/req at c64 "
        "| errors | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, system in results["systems"].items():
        lo, hi = system["phases"].get("c1"), system["phases"].get("c64")
        errors = sum(_all_errors(ph) for ph in system["phases"].values())
        lines.append(
            f"| {name} | {_fmt(lo['latency_ms'].get('p50') if lo else None)} "
            f"| {_fmt(hi['throughput_rps'] if hi else None, 0)} "
            f"| {_fmt(hi['latency_ms'].get('p50') if hi else None)} "
            f"| {_fmt(hi['latency_ms'].get('p99') if hi else None)} "
            f"| {_fmt(hi['cpu_us_per_request'] if hi else None, 0)} | {errors} "
            f"| {_fmt(system['rss_mb']['peak_total'], 0)} |"
        )
    lines += _ratio_lines(results["ratios"])
    note = summary_note(results)
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _rounds_text(results: dict[str, Any]) -> str:
    rounds = results["config"].get("rounds") or 1
    if rounds == 1:
        return ""
    return f"; {rounds} rounds over the systems in turn, each figure from its median round"


def _ratio_lines(r: dict[str, Any]) -> list[str]:
    lines = ["", "| figure | measured | target | met |", "|---|---:|---:|:-:|"]
    for key, t in r["targets"].items():
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        digits = 0 if key == "rss_mb_total" else DIGITS.get(key.removesuffix("_per_role"), 3)
        lines.append(f"| `{key}` | {_fmt(r[key], digits)} | {t['op']} {t['target']:g} | {met} |")
    if r.get("pss_mb_total") is not None:
        lines.append(f"| `pss_mb_total` (shared pages once) | {_fmt(r['pss_mb_total'], 0)} | | |")
    for key in ("cluster", "cluster_replicated"):
        figure = f"throughput_c64_{key}_vs_single"
        paired = r.get(f"{figure}_rounds")
        if figure not in r["targets"] and r.get(figure) is not None:
            lines.append(f"| `{figure}` (no target) | {_fmt(r[figure], 3)} | | |")
        if paired and len(paired) > 1:
            lines.append(
                f"| `{figure}` of each round (the figure: their median) "
                f"| {' / '.join(_fmt(v, 3) for v in paired)} | | |"
            )
    for key in (
        "redis_commands_per_request_single",
        "redis_commands_per_request_cluster",
        "redis_commands_per_request_cluster_replicated",
        "redis_bytes_per_request_single",
        "redis_bytes_per_request_cluster",
        "redis_bytes_per_request_cluster_replicated",
    ):
        if r.get(key) is not None:
            lines.append(f"| `{key}` (c64, all masters) | {_fmt(r[key], 1)} | | |")
    return lines


def _overload_lines(over: dict[str, Any] | None) -> list[str]:
    if not over:
        return []
    no, ok = over["refusal_latency_ms"], over["latency_ms"]
    lines = [
        "",
        f"Overload (`--overload`): c{over['concurrency']} against a gateway holding at most "
        f"{over['max_in_flight']} requests per process, {over['duration_s']:g} s; "
        f"{over['refused_share']:.1%} of {over['sent']} requests refused, {over['errors']} "
        "errors.",
        "",
        "| answer | per s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    echo = over.get("echo_reference") or {"throughput_rps": None, "latency_ms": {}}
    for name, rps, lat in (
        ("429", over["refused_rps"], no),
        ("200", over["throughput_rps"], ok),
        ("do-nothing server, same loop", echo["throughput_rps"], echo["latency_ms"]),
    ):
        lines.append(
            f"| {name} | {_fmt(rps, 0)} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} "
            f"| {_fmt(lat.get('p99'))} | {_fmt(lat.get('max'))} |"
        )
    rounds = over.get("rounds")
    if rounds and len(rounds["refusal_p50_ms"]) > 1:
        lines += ["", "429 p50 ms of every round: "
                  + " / ".join(_fmt(v) for v in rounds["refusal_p50_ms"]) + "."]  # fmt: skip
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The run as markdown: per system and load, then the ratios against the targets."""
    m = results["machine"]
    lines = [
        f"Run {results['date']} at commit `{results['commit']}`"
        f"{' (uncommitted changes)' if results.get('dirty') else ''}: {m['cpus']} x "
        f"{m['cpu_model'] or 'CPU'}, {m['mem_total_mb'] // 1024} GiB, Python {m['python']}; "
        f"{results['config']['duration']:g} s per load after "
        f"{results['config']['warmup']:g} s warm-up{_rounds_text(results)}; load generator: "
        f"{results['config']['loadgen_procs']} processes of raw HTTP/1.1 keep-alive.",
        "",
        "| system | load | req/s | p50 ms | p90 ms | p99 ms | errors | server CPU s "
        "| server CPU µs/req | load-gen µs/req | other CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, system in results["systems"].items():
        for label, ph in system["phases"].items():
            lat = ph["latency_ms"]
            lines.append(
                f"| {name} | {label} | {_fmt(ph['throughput_rps'], 0)} | {_fmt(lat.get('p50'))} "
                f"| {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_all_errors(ph)} "
                f"| {_fmt(ph['cpu_s']['total'])} | {_fmt(ph['cpu_us_per_request'], 0)} "
                f"| {_fmt(ph['loadgen']['cpu_us_per_request'], 0)} "
                f"| {_fmt(ph['machine']['other_cpu_s'])} |"
            )
    spread = [
        f"{name} {label} " + " / ".join(_fmt(v, 0) for v in ph["rounds"]["throughput_rps"])
        for name, system in results["systems"].items()
        for label, ph in system["phases"].items()
        if "rounds" in ph and label.startswith("c")
    ]
    if spread:
        lines += ["", "Requests/s of every round (the spread is the machine's noise): "
                  + "; ".join(spread) + "."]  # fmt: skip
    lines += [
        "",
        "| system | processes | peak RSS MB (all) | peak RSS MB by part "
        "| peak PSS MB (serving) | peak PSS MB by part |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, system in results["systems"].items():
        rss = system["rss_mb"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss["peak_by_component"].items()))
        pss = rss.get("peak_pss_by_component") or {}
        pss_parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(pss.items())) or "-"
        lines.append(
            f"| {name} | {system['processes']} | {_fmt(rss['peak_total'], 0)} | {parts} "
            f"| {_fmt(rss.get('peak_serving_pss'), 0)} | {pss_parts} |"
        )
    lines += [
        "",
        "RSS counts a page once per process that maps it, so a forked Redis (its AOF rewrite "
        "child) counts twice while it runs; PSS splits shared pages among their processes. "
        "`rss_mb_total` is the peak RSS sum of the serving processes (all but `rdv serve`'s "
        "supervisor), the stricter figure.",
    ]
    lags = [
        (name, label, ph["loadgen"]["send_lag_ms"])
        for name, system in results["systems"].items()
        for label, ph in system["phases"].items()
        if ph["loadgen"].get("send_lag_ms")
    ]
    if lags:
        lines += [
            "",
            "Open loop: latency counts from each request's scheduled time, so it includes the "
            "load generator's own send lag (timer granularity, waiting for a free connection): "
            + "; ".join(
                f"{name} {label} p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms"
                for name, label, lag in lags
            )
            + ".",
        ]
    cal = results.get("loadgen_calibration")
    if cal:
        lines += [
            "",
            f"Load generator ceiling on this machine: {_fmt(cal['throughput_rps'], 0)} req/s at "
            f"c{cal['concurrency']} against a do-nothing HTTP server "
            f"({_fmt(cal['loadgen']['cpu_us_per_request'], 0)} µs of load-generator CPU "
            "per request).",
        ]
    lines += _ratio_lines(results["ratios"])
    lines += _overload_lines(results.get("overload"))
    lines += markdown_lines(results)
    notes = results.get("notes")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
