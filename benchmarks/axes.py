"""Cost as the work grows (issue 18), the axes measured so far: shadowing challengers and
many-row requests.

    python -m benchmarks.axes [--axes challengers,rows] [--duration 10] [--rounds 2]

- ``challengers``: one ``rdv serve``, throughput at concurrency 64 with no challenger, then
  with three challengers shadowing every request (each its own worker process, as
  ``rdv serve`` runs them today): ``throughput_c64_3challengers_vs_none``.
- ``rows``: requests of 100 rows. Rows per second at concurrency 8 against the in-process
  baseline on the same bodies (``rows100_vs_inprocess``), and the gateway's p50 at
  concurrency 1 minus the baseline's (``added_p50_ms_c1_rows100``).

Rounds alternate the two sides of each ratio; each figure is the median of its rounds'
ratios. Results go to ``benchmarks/results/axes-<date>-<commit>.json`` under ``ratios``.
Not yet measured: 20 deployments on one host and the soak (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.loadgen import Load
from benchmarks.run import _git, demo_rows, log, run_phase
from benchmarks.systems import REPO, Running, start_inprocess, start_rdv

TOKEN = "bench-axes-token"
DEPLOYMENT = "breast-cancer"
CHALLENGERS = ("ch1", "ch2", "ch3")
ROWS = 100


def _admin(running: Running, method: str, path: str, doc: dict[str, Any] | None) -> Any:
    req = urllib.request.Request(
        f"{running.base_url}/admin{path}",
        data=None if doc is None else json.dumps(doc).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _with_bodies(running: Running, rows_per_request: int) -> Running:
    rows = demo_rows()
    bodies = tuple(
        json.dumps(
            {"instances": [rows[(i + k) % len(rows)] for k in range(rows_per_request)]}
        ).encode()
        for i in range(0, len(rows), max(1, len(rows) // 16))
    )
    return dataclasses.replace(running, target=dataclasses.replace(running.target, bodies=bodies))


def _workers_live(running: Running, roles: set[str], timeout_s: float = 60.0) -> None:
    """Wait until every role has a live worker (the supervisor starts one within seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = _admin(running, "GET", f"/deployments/{DEPLOYMENT}", None)
        live = {role for role, n in (doc.get("live_workers") or {}).items() if n > 0}
        if roles <= live:
            return
        time.sleep(0.5)
    raise RuntimeError(f"workers of {sorted(roles)} did not come up in {timeout_s:g} s")


def _phase(running: Running, load: Load) -> dict[str, Any]:
    figures = run_phase(running, load, 2 if load.concurrency > 8 else 1)
    log(f"{running.name} {load.label}: {figures['throughput_rps']:,.0f} req/s, "
        f"p50 {figures['latency_ms'].get('p50')} ms, errors {figures['errors']}")  # fmt: skip
    return figures


def _upload_challengers(running: Running, models: Path) -> list[int]:
    """Three new versions for the challengers: the real model's bytes again (a challenger
    costs what the model it runs costs; a version holds one role at a time)."""
    onnx = base64.b64encode((models / DEPLOYMENT / "2" / "model.onnx").read_bytes()).decode()
    versions = []
    for role in CHALLENGERS:
        doc = _admin(running, "POST", "/models", {
            "name": DEPLOYMENT, "deployment": DEPLOYMENT, "onnx_base64": onnx,
            "algorithm": f"gradient boosting (benchmark {role})",
        })  # fmt: skip
        versions.append(int(doc["version"]))
    return versions


def challengers_axis(
    gateway: Running, work: Path, duration_s: float, rounds: int
) -> dict[str, Any]:
    running = _with_bodies(gateway, 1)
    phases: dict[str, list[dict[str, Any]]] = {"none": [], "three": []}
    versions = _upload_challengers(running, work / "data" / "models")
    _phase(running, Load("closed", 64, duration_s=min(2.0, duration_s)))  # warm-up
    for round_no in range(rounds):
        for side in ("none", "three"):
            if side == "three":
                for role, version in zip(CHALLENGERS, versions, strict=True):
                    body = {"role": role, "version": version, "reason": "benchmark"}
                    _admin(running, "POST", f"/deployments/{DEPLOYMENT}/challengers", body)
                _workers_live(running, set(CHALLENGERS))
            phases[side].append(_phase(running, Load("closed", 64, duration_s=duration_s)))
            if side == "three":
                for role in CHALLENGERS:
                    _admin(running, "DELETE",
                           f"/deployments/{DEPLOYMENT}/challengers/{role}", None)  # fmt: skip
                if round_no + 1 < rounds:
                    time.sleep(3.0)  # their workers retire before the next "none"
    ratios = [t["throughput_rps"] / n["throughput_rps"]
              for n, t in zip(phases["none"], phases["three"], strict=True)]  # fmt: skip
    return {"phases": phases, "rounds": [round(r, 3) for r in ratios],
            "throughput_c64_3challengers_vs_none": round(statistics.median(ratios), 3)}  # fmt: skip


def rows_axis(gateway: Running, work: Path, duration_s: float, rounds: int) -> dict[str, Any]:
    gateway = _with_bodies(gateway, ROWS)
    model = work / "data" / "models" / DEPLOYMENT / "2" / "model.onnx"
    baseline = _with_bodies(start_inprocess(model, work), ROWS)
    out: dict[str, list[dict[str, Any]]] = {"gateway_c8": [], "inprocess_c8": [],
                                            "gateway_c1": [], "inprocess_c1": []}  # fmt: skip
    try:
        for system in (gateway, baseline):
            _phase(system, Load("closed", 8, duration_s=min(2.0, duration_s)))  # warm-up
        for _ in range(rounds):
            for name, system in (("gateway", gateway), ("inprocess", baseline)):
                out[f"{name}_c8"].append(_phase(system, Load("closed", 8, duration_s=duration_s)))
                out[f"{name}_c1"].append(_phase(system, Load("closed", 1, duration_s=duration_s)))
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
        },
    }


AXES = {"challengers": challengers_axis, "rows": rows_axis}
RATIO_KEYS = (
    "throughput_c64_3challengers_vs_none",
    "rows100_vs_inprocess",
    "added_p50_ms_c1_rows100",
)


def run_axes(
    names: list[str], duration_s: float, rounds: int, work: Path, models: Path | None = None
) -> dict[str, Any]:
    """Every axis on one ``rdv serve`` (the challengers leave with their axis); ``models``:
    trained demo models to start from instead of training them."""
    results: dict[str, Any] = {"axes": {}, "ratios": {}}
    if models is not None:
        shutil.copytree(models, work / "data" / "models")
    gateway = start_rdv(work / "data", work, settings={"RDV_ADMIN_TOKEN": TOKEN})
    try:
        for name in names:
            log(f"axis {name}")
            figures = AXES[name](gateway, work, duration_s, rounds)
            results["axes"][name] = figures
            results["ratios"].update({k: figures[k] for k in RATIO_KEYS if k in figures})
    finally:
        gateway.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.axes", description=__doc__)
    p.add_argument("--axes", default=",".join(AXES), help="of " + ",".join(AXES))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--models", type=Path, help="trained demo models (default: train them)")
    args = p.parse_args(argv)
    names = [a for a in args.axes.split(",") if a]
    unknown = [a for a in names if a not in AXES]
    if unknown:
        p.error(f"unknown axes {unknown}; known: {', '.join(AXES)}")
    work = Path(tempfile.mkdtemp(prefix="rdv-axes-"))
    results = run_axes(names, args.duration, args.rounds, work, args.models)
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    doc = {"date": date, "commit": commit, "machine": procstat.machine(),
           "config": {"axes": names, "duration_s": args.duration, "rounds": args.rounds},
           **results}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"axes-{date}-{commit}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["ratios"], indent=1))
    log(f"results in {path}")


if __name__ == "__main__":
    main()
