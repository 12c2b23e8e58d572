"""``benchmarks.run --overload``: per round, a gateway at a small in-flight bound under many
more connections than it may hold (how long its 429s and its 200s take), beside a do-nothing
server under the same loop; then the rounds combined into one figure."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.baselines import start_echo
from benchmarks.harness import log
from benchmarks.load_phase import run_phase
from benchmarks.loadgen import Load, run_load
from benchmarks.systems import start_rdv


def overload_phase(
    args: argparse.Namespace, work: Path, rows: list[list[float]], round_no: int
) -> dict[str, Any]:
    """A fresh ``rdv serve`` whose gateway processes hold at most ``--overload-max-in-flight``
    requests each, under a closed loop of ``--overload`` connections: nearly every request
    finds its process full, so the phase measures how fast a refusal comes (a closed loop's
    latency is its connections over the answers per second, so this is also how many
    refusals a second the gateway gives while it serves its bound). Then the do-nothing
    server under the same loop: the floor of that latency on this machine."""
    data = work / f"rdv-overload-{round_no}"
    for trained in (work / "rdv-data-1" / "models", work / "rdv-overload-1" / "models"):
        if trained.is_dir() and not (data / "models").exists():
            shutil.copytree(trained, data / "models")
    settings = {**dict(args.set), "RDV_MAX_IN_FLIGHT": str(args.overload_max_in_flight)}
    running = start_rdv(data, work, args.gateway_processes, settings=settings)
    try:
        running.target = dataclasses.replace(
            running.target, bodies=tuple(json.dumps(running.body(r)).encode() for r in rows)
        )
        if args.warmup > 0:  # within the bound: the models and the path warm, no refusal
            warm = Load("closed", args.overload_max_in_flight, duration_s=min(args.warmup, 1.0))
            run_load(running.target, warm, args.loadgen_procs)
        load = Load("closed", args.overload, duration_s=args.overload_duration)
        phase = run_phase(running, load, args.loadgen_procs)
    finally:
        running.stop()
        time.sleep(1.0)
    echo = start_echo(work)
    try:
        echo.target = dataclasses.replace(echo.target, bodies=running.target.bodies)
        floor = run_phase(echo, load, args.loadgen_procs)
    finally:
        echo.stop()
    phase["echo_reference"] = {
        "throughput_rps": floor["throughput_rps"],
        "latency_ms": {k: floor["latency_ms"].get(k) for k in ("p50", "p90", "p99", "max")},
        "errors": floor["errors"],
    }
    phase["max_in_flight"] = args.overload_max_in_flight
    phase["refused_share"] = round(phase["refused"] / max(phase["sent"], 1), 4)
    ok, no = phase["latency_ms"], phase["refusal_latency_ms"]
    log(
        f"overload c{args.overload} (bound {args.overload_max_in_flight} per process): "
        f"429 p50 {no.get('p50')} ms p99 {no.get('p99')} ms ({phase['refused_rps']:.0f}/s, "
        f"{phase['refused_share']:.1%}); 200 p50 {ok.get('p50')} ms p99 {ok.get('p99')} ms "
        f"({phase['throughput_rps']:.0f}/s); errors {phase['errors']}; a do-nothing server: "
        f"p50 {floor['latency_ms'].get('p50')} ms ({floor['throughput_rps']:.0f}/s)"
    )
    return phase


def combine_overload(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median 429 p50, whole, with every round's figures beside it."""
    ordered = sorted(phases, key=lambda ph: ph["refusal_latency_ms"].get("p50") or 0.0)
    median = dict(ordered[len(ordered) // 2])
    median["rounds"] = {
        "refusal_p50_ms": [ph["refusal_latency_ms"].get("p50") for ph in phases],
        "refusal_p99_ms": [ph["refusal_latency_ms"].get("p99") for ph in phases],
        "refused_rps": [ph["refused_rps"] for ph in phases],
        "ok_p50_ms": [ph["latency_ms"].get("p50") for ph in phases],
        "refused_share": [ph["refused_share"] for ph in phases],
        "echo_p50_ms": [ph["echo_reference"]["latency_ms"].get("p50") for ph in phases],
        "errors": [ph["errors"] for ph in phases],
    }
    return median
