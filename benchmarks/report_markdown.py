"""The benchmark run as markdown: the full table of every system and load, and the README's
short form; the figures and ratios come from ``benchmarks.report``."""

from __future__ import annotations

from typing import Any

from benchmarks.axes_report import DIGITS, fmt, markdown_lines, summary_note
from benchmarks.report import all_errors


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
        errors = sum(all_errors(ph) for ph in system["phases"].values())
        lines.append(
            f"| {name} | {fmt(lo['latency_ms'].get('p50') if lo else None)} "
            f"| {fmt(hi['throughput_rps'] if hi else None, 0)} "
            f"| {fmt(hi['latency_ms'].get('p50') if hi else None)} "
            f"| {fmt(hi['latency_ms'].get('p99') if hi else None)} "
            f"| {fmt(hi['cpu_us_per_request'] if hi else None, 0)} | {errors} "
            f"| {fmt(system['rss_mb']['peak_total'], 0)} |"
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
    return (f"; {rounds} rounds over the systems in turn, each system's figures from its median "
            "round, its ratios to the in-process baseline and to the single node the median "
            "of each round's own")  # fmt: skip


def _ratio_lines(r: dict[str, Any]) -> list[str]:
    lines = ["", "| figure | measured | target | met |", "|---|---:|---:|:-:|"]
    for key, t in r["targets"].items():
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        digits = 0 if key == "rss_mb_total" else DIGITS.get(key.removesuffix("_per_role"), 3)
        lines.append(f"| `{key}` | {fmt(r[key], digits)} | {t['op']} {t['target']:g} | {met} |")
    if r.get("pss_mb_total") is not None:
        lines.append(f"| `pss_mb_total` (shared pages once) | {fmt(r['pss_mb_total'], 0)} | | |")
    for figure in ("throughput_c64_vs_inprocess", "added_p50_ms_c1", "p99_c64_vs_inprocess",
                   "throughput_c64_cluster_vs_single",
                   "throughput_c64_cluster_replicated_vs_single"):  # fmt: skip
        paired = r.get(f"{figure}_rounds")
        if figure not in r["targets"] and r.get(figure) is not None:
            lines.append(f"| `{figure}` (no target) | {fmt(r[figure], 3)} | | |")
        if paired and len(paired) > 1:
            lines.append(
                f"| `{figure}` of each round (the figure: their median) "
                f"| {' / '.join(fmt(v, 3) for v in paired)} | | |"
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
            lines.append(f"| `{key}` (c64, all masters) | {fmt(r[key], 1)} | | |")
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
            f"| {name} | {fmt(rps, 0)} | {fmt(lat.get('p50'))} | {fmt(lat.get('p90'))} "
            f"| {fmt(lat.get('p99'))} | {fmt(lat.get('max'))} |"
        )
    rounds = over.get("rounds")
    if rounds and len(rounds["refusal_p50_ms"]) > 1:
        lines += ["", "429 p50 ms of every round: "
                  + " / ".join(fmt(v) for v in rounds["refusal_p50_ms"]) + "."]  # fmt: skip
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
                f"| {name} | {label} | {fmt(ph['throughput_rps'], 0)} | {fmt(lat.get('p50'))} "
                f"| {fmt(lat.get('p90'))} | {fmt(lat.get('p99'))} | {all_errors(ph)} "
                f"| {fmt(ph['cpu_s']['total'])} | {fmt(ph['cpu_us_per_request'], 0)} "
                f"| {fmt(ph['loadgen']['cpu_us_per_request'], 0)} "
                f"| {fmt(ph['machine']['other_cpu_s'])} |"
            )
    spread = [
        f"{name} {label} " + " / ".join(fmt(v, 0) for v in ph["rounds"]["throughput_rps"])
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
            f"| {name} | {system['processes']} | {fmt(rss['peak_total'], 0)} | {parts} "
            f"| {fmt(rss.get('peak_serving_pss'), 0)} | {pss_parts} |"
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
            f"Load generator ceiling on this machine: {fmt(cal['throughput_rps'], 0)} req/s at "
            f"c{cal['concurrency']} against a do-nothing HTTP server "
            f"({fmt(cal['loadgen']['cpu_us_per_request'], 0)} µs of load-generator CPU "
            "per request).",
        ]
    lines += _ratio_lines(results["ratios"])
    lines += _overload_lines(results.get("overload"))
    lines += markdown_lines(results)
    notes = results.get("notes")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
