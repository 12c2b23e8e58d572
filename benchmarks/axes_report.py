"""Issue 18's figures in a results JSON: the ratio keys with their targets, and the axes'
tables in the markdown. Pure: reads the ``axes`` that ``benchmarks.axes`` measured."""

from __future__ import annotations

from typing import Any

AXIS_TARGETS: dict[str, tuple[str, float]] = {
    "throughput_c64_3challengers_vs_none": (">=", 0.7),
    "rows100_vs_inprocess": (">=", 0.8),
    "added_p50_ms_c1_rows100": ("<=", 1.0),
    "rss_mb_20_deployments": ("<=", 1200.0),
    "idle_cpu_pct_20_deployments": ("<=", 5.0),
    "throughput_20_deployments_vs_one": (">=", 0.9),
    "soak_rss_growth_pct": ("<=", 5.0),
    "soak_redis_memory_growth_pct": ("<=", 10.0),
    "soak_p99_last_vs_first": ("<=", 1.2),
    "soak_errors": ("<=", 0.0),
}
"""Issue 18's targets (2-core machine, one ``make bench`` run)."""

AXIS_OF = {
    "throughput_c64_3challengers_vs_none": "challengers",
    "rows100_vs_inprocess": "rows",
    "added_p50_ms_c1_rows100": "rows",
    "rss_mb_20_deployments": "deployments",
    "idle_cpu_pct_20_deployments": "deployments",
    "throughput_20_deployments_vs_one": "deployments",
    "soak_rss_growth_pct": "soak",
    "soak_redis_memory_growth_pct": "soak",
    "soak_p99_last_vs_first": "soak",
    "soak_errors": "soak",
}
PER_ROLE = "_per_role"
DEPLOYMENT_EXTRAS = ("pss_mb_20_deployments", "processes_20_deployments",
                     "deployments_layout", "deployments_measured")  # fmt: skip
SOAK_EXTRAS = ("soak_redis_memory_growth_pct_besides_outcomes",)
"""Figures beside the targets, without one."""
DIGITS = {"rss_mb_20_deployments": 0, "pss_mb_20_deployments": 0, "soak_errors": 0,
          "idle_cpu_pct_20_deployments": 2, "soak_rss_growth_pct": 2,
          "soak_redis_memory_growth_pct": 2}  # fmt: skip


def _met(value: Any, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return bool(value >= bound if op == ">=" else value <= bound)


def axis_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every issue-18 key (``None`` where its axis did not run), the deployments axis's
    per-role figures and extras when measured, and ``targets`` for the keys."""
    axes = results.get("axes") or {}
    out: dict[str, Any] = {key: axes.get(axis, {}).get(key) for key, axis in AXIS_OF.items()}
    deployments = axes.get("deployments") or {}
    for key in DEPLOYMENT_EXTRAS:
        if key in deployments:
            out[key] = deployments[key]
    soak = axes.get("soak") or {}
    for key in SOAK_EXTRAS:
        if key in soak:
            out[key] = soak[key]
    targets = {}
    for key, (op, bound) in AXIS_TARGETS.items():
        targets[key] = {"op": op, "target": bound, "met": _met(out[key], op, bound)}
        if key + PER_ROLE in deployments:
            out[key + PER_ROLE] = value = deployments[key + PER_ROLE]
            targets[key + PER_ROLE] = {"op": op, "target": bound, "met": _met(value, op, bound)}
    out["targets"] = targets
    return out


def fmt(value: Any, digits: int = 2) -> str:
    """A figure for a markdown table: thousands separated, ``digits`` decimals, "-" for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_note(results: dict[str, Any]) -> str:
    """What the issue-18 rows of the README's table measured, in a sentence."""
    cfg = results.get("config", {}).get("axes_options") or {}
    axes = results.get("axes") or {}
    if not axes:
        return ""
    parts = []
    dep = axes.get("deployments")
    if dep:
        parts.append(f"{dep['deployments_measured']} deployments, worker layout "
                     f"`{dep['deployments_layout']}`")  # fmt: skip
    soak = axes.get("soak")
    if soak:
        parts.append(f"a soak of {soak['soak_s']:g} s at {soak['rate']:g} req/s "
                     f"(half the c64 peak) after {soak['warmup_s']:g} s warm-up")  # fmt: skip
    if cfg.get("duration_s"):
        parts.append(f"{cfg['duration_s']:g} s a load, rounds: {cfg.get('rounds')}")
    failed = [k.removeprefix("axis:") for k in results.get("failed", {}) if k.startswith("axis:")]
    text = "Issue 18's axes: " + "; ".join(parts) + "." if parts else ""
    if failed:
        text += f" Not measured (failed): {', '.join(failed)}."
    return text


def markdown_lines(results: dict[str, Any]) -> list[str]:
    """The axes' own tables for the run's ``.md``."""
    axes = results.get("axes") or {}
    lines: list[str] = []
    dep = axes.get("deployments")
    if dep:
        lines += ["", f"Deployments axis ({dep['deployments_measured']} deployments):", "",
                  "| layout | live after s | processes | workers | RSS MB | PSS MB | Redis "
                  "used MB | idle CPU % | c64 req/s many / one (rounds) | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for name, fig in dep["layouts"].items():
            mem, thr = fig["memory"], fig["throughput"]
            pairs = " ; ".join(
                f"{m['throughput_rps']:,.0f} / {o['throughput_rps']:,.0f}"
                for m, o in zip(thr["phases"]["many"], thr["phases"]["one"], strict=True)
            )
            lines.append(
                f"| {name} | {fig['all_live_s']:g} | {mem['processes']} "
                f"| {mem['worker_processes']} | {fmt(mem['rss_mb_total'], 0)} "
                f"| {fmt(mem['pss_mb_total'], 0)} | {fmt(mem['redis_used_memory_mb'], 1)} "
                f"| {fmt(fig['idle']['cpu_pct'])} | {pairs} | {fmt(thr['ratio'], 3)} |"
            )
            parts = ", ".join(f"{k} {v['processes']} x {v['rss_mb'] / v['processes']:.0f}"
                              for k, v in sorted(mem["by_component"].items()))  # fmt: skip
            lines.append(f"| {name}: processes x mean RSS MB | {parts} | | | | | | | | |")
    soak = axes.get("soak")
    if soak:
        mem = soak["memory"]
        lines += [
            "",
            f"Soak: {soak['soak_s']:g} s at {soak['rate']:g} req/s (peak "
            f"{soak['peak']['throughput_rps']:,.0f} at c64), {soak['ok']:,} answered, "
            f"{soak['soak_errors']} not; windows {soak['windows_s']['first']} and "
            f"{soak['windows_s']['last']} s; p99 {soak['p99_ms']['first']} -> "
            f"{soak['p99_ms']['last']} ms; RSS growth by process (%): "
            + ", ".join(f"{k} {fmt(v)}" for k, v in mem["rss_growth_pct_by_process"].items())
            + f"; Redis used_memory {fmt(mem['soak_redis_memory_growth_pct'])} %"
            + _besides_outcomes(mem)
            + ".",
        ]
    return lines


def _besides_outcomes(mem: dict[str, Any]) -> str:
    besides = mem.get("soak_redis_memory_growth_pct_besides_outcomes")
    held = mem.get("redis_outcome_store_mb") or [None, None]
    if besides is None:
        return ""
    return (f", {fmt(besides)} % besides the outcome store (the answers kept for labels, "
            f"{fmt(held[0])} -> {fmt(held[1])} MB in the two windows)")  # fmt: skip
