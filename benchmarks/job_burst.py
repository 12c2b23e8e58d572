"""Realtime latency while async jobs pour in: what a caller of ``predict`` feels when other
clients submit large jobs to the same gateway.

Starts ``rdv serve`` (the job bounds raised, so that no submission is refused), measures one
realtime caller (a blocking client in this process: a request, then 20 ms of pause) on a quiet
system, then again while ``--connections`` clients (in a child process with its own event
loop, so that the load generator's loop delays no realtime request) submit ``--rows``-row jobs
as fast as they are accepted. The figure is the realtime p50 and p99 during the burst over
those of the quiet system, with the submissions accepted a second beside it (the jobs' side of
the trade). Each round is a fresh system; the rounds' figures and their median are written to
``benchmarks/results/job-burst-<date>-<commit>.json``.

    python -m benchmarks.job_burst [--connections 10] [--rows 1000] [--duration 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import git, log
from benchmarks.systems import REPO, start_rdv
from models.train import DEMO_DEPLOYMENT, demo_data

PAUSE_S = 0.02
"""Between two realtime requests: a steady caller, not a load of its own."""


def _submit(base: str, body: bytes, connections: int, seconds: float, out: Any) -> None:
    """The submitting clients, for ``seconds``: accepted and refused submissions."""

    async def run() -> dict[str, int]:
        counts = {"accepted": 0, "refused": 0}
        stop = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

            async def one() -> None:
                while time.monotonic() < stop:
                    r = await client.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/jobs", content=body,
                                          headers={"content-type": "application/json"})  # fmt: skip
                    counts["accepted" if r.status_code == 202 else "refused"] += 1
                    if r.status_code != 202:
                        await asyncio.sleep(0.05)

            await asyncio.gather(*(one() for _ in range(connections)))
        return counts

    out.put(asyncio.run(run()))


def realtime(base: str, bodies: list[bytes], seconds: float) -> tuple[list[float], dict[int, int]]:
    """One caller's latencies (ms) and statuses over ``seconds``."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/deployments/{DEMO_DEPLOYMENT}/predict",
                         body=bodies[i % len(bodies)],
                         headers={"content-type": "application/json"})  # fmt: skip
            reply = conn.getresponse()
            reply.read()
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            i += 1
            time.sleep(PAUSE_S)
    finally:
        conn.close()
    return latencies, statuses


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(len(ordered) * 0.9)], 2),
        "p99": round(ordered[int(len(ordered) * 0.99)], 2),
    }


def one_round(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = demo_data().x_test.tolist()
    job = json.dumps({"instances": (rows * (args.rows // len(rows) + 1))[: args.rows]}).encode()
    singles = [json.dumps({"instances": [r]}).encode() for r in rows[:50]]
    settings = {"RDV_JOB_MAX_QUEUED": "1000000", "RDV_JOB_MAX_HELD_BYTES": str(8 << 30)}
    if args.models is not None:  # trained already: no training at start
        shutil.copytree(args.models, work / "data" / "models")
    running = start_rdv(work / "data", work, settings=settings)
    try:
        quiet, _ = realtime(running.base_url, singles, args.quiet)
        results: Any = multiprocessing.get_context("spawn").Queue()
        submitters = multiprocessing.get_context("spawn").Process(
            target=_submit,
            args=(running.base_url, job, args.connections, args.duration, results),
        )
        submitters.start()
        warm_s = min(2.0, args.duration / 4)
        time.sleep(warm_s)  # the burst under way
        burst, statuses = realtime(running.base_url, singles, args.duration - warm_s - 1.0)
        submitted = results.get(timeout=120)
        submitters.join(30)
    finally:
        running.stop()
    q, b = percentiles(quiet), percentiles(burst)
    return {
        "quiet_ms": q,
        "burst_ms": b,
        "burst_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "submissions": submitted,
        "accepted_per_s": round(submitted["accepted"] / args.duration, 1),
        "p50_burst_vs_quiet": round(b["p50"] / q["p50"], 2),
        "p99_burst_vs_quiet": round(b["p99"] / q["p99"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=10, help="clients submitting jobs")
    p.add_argument("--rows", type=int, default=1000, help="rows a job")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of the burst")
    p.add_argument("--quiet", type=float, default=3.0, help="seconds measured before it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", type=Path, help="a trained demo models folder to start from")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="rdv-job-burst-") as work:
            rounds.append(one_round(args, Path(work)))
        log(f"round {n + 1}: {json.dumps(rounds[-1])}")
    keys = ("p50_burst_vs_quiet", "p99_burst_vs_quiet", "accepted_per_s")
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "models")},
        "median": {k: statistics.median(r[k] for r in rounds) for k in keys},
        "rounds": rounds,
    }
    out = args.out or REPO / "benchmarks" / "results" / (
        f"job-burst-{report['date']}-{commit}.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"]))
    log(f"written to {out}")


if __name__ == "__main__":
    main()
