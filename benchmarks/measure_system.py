"""One started system of ``benchmarks.run`` measured in full: its answers checked against
onnxruntime's labels, a warm-up, every load of the run (closed loops at each concurrency, the
open loop), and the memory of its processes throughout."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from benchmarks import procstat
from benchmarks.harness import log
from benchmarks.load_phase import run_phase
from benchmarks.loadgen import Load, run_load
from benchmarks.report import SYSTEM_TITLES
from benchmarks.systems import Running


def measure(
    running: Running,
    args: argparse.Namespace,
    rows: list[list[float]],
    expected: list[int],
    startup_s: float,
) -> dict[str, Any]:
    target = dataclasses.replace(
        running.target, bodies=tuple(json.dumps(running.body(r)).encode() for r in rows)
    )
    running.target = target
    agree = [running.predict_labels(r)[0] for r in rows[: len(expected)]] == expected
    if not agree:
        log(f"{running.name}: labels differ from onnxruntime's on the same rows")
    loads = [Load("closed", c, duration_s=args.duration) for c in args.concurrency]
    if args.rate > 0:
        loads.append(Load("open", rate=args.rate, duration_s=args.duration))
    phases: dict[str, Any] = {}
    with procstat.MemoryWatch(running.tree) as mem:
        if args.warmup > 0:
            warm = Load("closed", max(args.concurrency), duration_s=args.warmup)
            run_load(target, warm, args.loadgen_procs)
        for load in loads:
            phases[load.label] = phase = run_phase(running, load, args.loadgen_procs)
            lat = phase["latency_ms"]
            cmds = (phase["redis"] or {}).get("commands_per_request")
            log(
                f"{running.name} {load.label}: {phase['throughput_rps']:.0f} req/s, "
                f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, errors {phase['errors']}"
                + (f", {cmds} Redis commands/req" if cmds is not None else "")
            )
    members = running.tree.members()
    hwm = sum(procstat.hwm_bytes(p) for p in members)
    return {
        "title": SYSTEM_TITLES[running.name],
        "info": running.info,
        "startup_s": round(startup_s, 2),
        "labels_agree_with_onnxruntime": agree,
        "processes": len(members),
        "process_components": sorted(set(members.values())),
        "rss_mb": {
            "peak_total": round(mem.peak_total_bytes / procstat.MB, 1),
            "peak_serving_total": round(mem.peak_serving_bytes / procstat.MB, 1),
            "peak_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.peak_by_component.items()
            },
            "end_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.last_by_component.items()
            },
            "sum_of_process_hwm": round(hwm / procstat.MB, 1),
            "peak_serving_pss": round(mem.peak_serving_pss_bytes / procstat.MB, 1),
            "peak_pss_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.peak_pss_by_component.items()
            },
        },
        "phases": phases,
    }
