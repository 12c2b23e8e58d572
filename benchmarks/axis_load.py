"""Two axes of issue 18 on one ``rdv serve``: shadowing challengers, and many-row requests.

- ``challengers``: throughput at concurrency 64 with no challenger, then with three
  challengers shadowing every request: ``throughput_c64_3challengers_vs_none``.
- ``rows``: requests of 100 rows. Rows per second at concurrency 8 against the in-process
  baseline on the same bodies (``rows100_vs_inprocess``), and the gateway's p50 at
  concurrency 1 minus the baseline's (``added_p50_ms_c1_rows100``).

Rounds alternate the two sides of each ratio; each figure is the median of its rounds' ratios.
"""

from __future__ import annotations

import base64
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.axis_common import DEPLOYMENT, AxisContext, admin, phase, with_bodies, workers_live
from benchmarks.baselines import start_inprocess
from benchmarks.loadgen import Load
from benchmarks.systems import Running

CHALLENGERS = ("ch1", "ch2", "ch3")
ROWS = 100


def _upload_challengers(running: Running, models: Path) -> list[int]:
    """Three new versions for the challengers: the real model's bytes again (a challenger
    costs what the model it runs costs; a version holds one role at a time)."""
    onnx = base64.b64encode((models / DEPLOYMENT / "2" / "model.onnx").read_bytes()).decode()
    versions = []
    for role in CHALLENGERS:
        doc = admin(running, "POST", "/models", {
            "name": DEPLOYMENT, "deployment": DEPLOYMENT, "onnx_base64": onnx,
            "algorithm": f"gradient boosting (benchmark {role})",
        })  # fmt: skip
        versions.append(int(doc["version"]))
    return versions


def add_challengers(running: Running, models: Path, count: int = len(CHALLENGERS)) -> None:
    """``count`` challengers shadowing every request, their workers live (for a profile)."""
    versions = _upload_challengers(running, models)[:count]
    for role, version in zip(CHALLENGERS, versions, strict=False):
        body = {"role": role, "version": version, "reason": "benchmark"}
        admin(running, "POST", f"/deployments/{DEPLOYMENT}/challengers", body)
    workers_live(running, set(CHALLENGERS[:count]))


def challengers_axis(ctx: AxisContext) -> dict[str, Any]:
    duration_s, rounds = ctx.options.duration_s, ctx.options.rounds
    running = with_bodies(ctx.shared(), 1)
    phases: dict[str, list[dict[str, Any]]] = {"none": [], "three": []}
    versions = _upload_challengers(running, ctx.models)
    phase(running, Load("closed", 64, duration_s=min(2.0, duration_s)))  # warm-up
    for round_no in range(rounds):
        for side in ("none", "three"):
            if side == "three":
                for role, version in zip(CHALLENGERS, versions, strict=True):
                    body = {"role": role, "version": version, "reason": "benchmark"}
                    admin(running, "POST", f"/deployments/{DEPLOYMENT}/challengers", body)
                workers_live(running, set(CHALLENGERS))
            phases[side].append(phase(running, Load("closed", 64, duration_s=duration_s)))
            if side == "three":
                for role in CHALLENGERS:
                    admin(running, "DELETE",
                          f"/deployments/{DEPLOYMENT}/challengers/{role}", None)  # fmt: skip
                if round_no + 1 < rounds:
                    time.sleep(3.0)  # their workers retire before the next "none"
    ratios = [t["throughput_rps"] / n["throughput_rps"]
              for n, t in zip(phases["none"], phases["three"], strict=True)]  # fmt: skip
    return {"phases": phases, "rounds": [round(r, 3) for r in ratios],
            "throughput_c64_3challengers_vs_none": round(statistics.median(ratios), 3)}  # fmt: skip


def rows_axis(ctx: AxisContext) -> dict[str, Any]:
    duration_s, rounds = ctx.options.duration_s, ctx.options.rounds
    gateway = with_bodies(ctx.shared(), ROWS)
    model = ctx.models / DEPLOYMENT / "2" / "model.onnx"
    baseline = with_bodies(start_inprocess(model, ctx.work), ROWS)
    out: dict[str, list[dict[str, Any]]] = {"gateway_c8": [], "inprocess_c8": [],
                                            "gateway_c1": [], "inprocess_c1": []}  # fmt: skip
    try:
        for system in (gateway, baseline):
            phase(system, Load("closed", 8, duration_s=min(2.0, duration_s)))  # warm-up
        for _ in range(rounds):
            for name, system in (("gateway", gateway), ("inprocess", baseline)):
                out[f"{name}_c8"].append(phase(system, Load("closed", 8, duration_s=duration_s)))
                out[f"{name}_c1"].append(phase(system, Load("closed", 1, duration_s=duration_s)))
    finally:
        baseline.stop()
    rows_ratio = [g["throughput_rps"] / b["throughput_rps"]
                  for g, b in zip(out["gateway_c8"], out["inprocess_c8"], strict=True)]  # fmt: skip
    added = [g["latency_ms"]["p50"] - b["latency_ms"]["p50"]
             for g, b in zip(out["gateway_c1"], out["inprocess_c1"], strict=True)]  # fmt: skip
    return {
        "phases": out,
        "rows_per_request": ROWS,
        "rows_per_s_c8": {
            "gateway": statistics.median(p["throughput_rps"] * ROWS for p in out["gateway_c8"]),
            "inprocess": statistics.median(p["throughput_rps"] * ROWS for p in out["inprocess_c8"]),
        },
        "rows100_vs_inprocess": round(statistics.median(rows_ratio), 3),
        "added_p50_ms_c1_rows100": round(statistics.median(added), 3),
        "rounds": {
            "rows100_vs_inprocess": [round(r, 3) for r in rows_ratio],
            "added_p50_ms_c1_rows100": [round(a, 3) for a in added],
            # how evenly each side's two processes shared c8's connections (0.5: evenly)
            "busiest_share_c8": {
                "gateway": _busiest(out["gateway_c8"], "gateway"),
                "inprocess": _busiest(out["inprocess_c8"], "uvicorn-worker"),
            },
        },
    }


def _busiest(phases: list[dict[str, Any]], component: str) -> list[float | None]:
    return [p["cpu_busiest_share"].get(component) for p in phases]
