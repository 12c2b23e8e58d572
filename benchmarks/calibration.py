"""The load generator's ceiling, measured before any system (``--no-calibrate`` skips it):
what it drives against a do-nothing server on this machine, in this run, so that a system's
figures can be read against what the load generator could have driven."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.baselines import start_echo
from benchmarks.harness import log
from benchmarks.load_phase import run_phase
from benchmarks.loadgen import Load


def calibrate(args: argparse.Namespace, work: Path, rows: list[list[float]]) -> dict[str, Any]:
    """The load generator against a do-nothing server at the highest concurrency: what it
    reaches there bounds from below what it can drive, on this machine, in this run."""
    echo = start_echo(work)
    try:
        echo.target = dataclasses.replace(
            echo.target, bodies=tuple(json.dumps(echo.body(r)).encode() for r in rows)
        )
        load = Load("closed", max(args.concurrency), duration_s=min(args.duration, 3.0))
        phase = run_phase(echo, load, args.loadgen_procs)
    finally:
        echo.stop()
    log(f"load generator ceiling: {phase['throughput_rps']:.0f} req/s at {load.label} "
        f"against a do-nothing server")  # fmt: skip
    return phase
