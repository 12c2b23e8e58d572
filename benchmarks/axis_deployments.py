"""The deployments axis of issue 18: what many deployments cost one host.

One ``rdv serve`` gets ``--deployments`` N (default 20) deployments, the demo one and N - 1
created through the admin API, each a real (the demo's gradient-boosting bytes) and a canary
(the logistic regression's), each model uploaded as a version of its own. Once every role of
every deployment has a live worker and the system has settled:

- ``rss_mb_20_deployments``: RSS summed over every process of the tree (supervisor, gateways,
  workers, log bin, Redis), with each process's figure and PSS (shared pages once) beside it;
- ``idle_cpu_pct_20_deployments``: CPU of all of them over ``--idle-s`` of no traffic, in % of
  one core;
- ``throughput_20_deployments_vs_one``: c64 throughput on the demo deployment (the other N - 1
  idle) over the same on a fresh single-deployment ``rdv serve``. Both stay up; whichever is not
  measured is held still (SIGSTOP, see ``held_still``), so each is measured alone; rounds
  alternate which goes first; the figure is the median of the rounds' ratios.

``--layout`` passes ``RDV_WORKER_LAYOUT`` to both servers (``both``: ``shared``, then
``per-role`` under keys ending ``_per_role``); unset, the server's default is measured.
"""

from __future__ import annotations

import base64
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.axis_common import (
    DEPLOYMENT,
    AxisContext,
    admin,
    held_still,
    live_roles,
    phase,
    redis_used_memory_mb,
    with_bodies,
)
from benchmarks.harness import log
from benchmarks.loadgen import Load
from benchmarks.systems import Running, http_status

ROLES = {"real", "canary"}
KEYS = ("rss_mb_20_deployments", "idle_cpu_pct_20_deployments", "throughput_20_deployments_vs_one")
EXTRA_KEYS = ("pss_mb_20_deployments", "processes_20_deployments")
NOT_WORKERS = ("supervisor", "gateway", "logbin", "redis")


def create_deployments(running: Running, models: Path, count: int) -> list[str]:
    """The demo deployment and ``count - 1`` more, each with its own two model versions
    (``models``: the trained demo models)."""
    demo = models / DEPLOYMENT
    onnx = {v: base64.b64encode((demo / str(v) / "model.onnx").read_bytes()).decode()
            for v in (1, 2)}  # fmt: skip
    names = [DEPLOYMENT]
    for i in range(1, count):
        name = f"bench-{i:02d}"
        for version in (1, 2):
            admin(running, "POST", "/models", {
                "name": name, "version": version, "deployment": DEPLOYMENT,
                "onnx_base64": onnx[version], "algorithm": "benchmark copy of the demo's",
            })  # fmt: skip
        admin(running, "POST", "/deployments", {
            "name": name, "real": {"model": name, "version": 2},
            "canary": {"model": name, "version": 1}, "reason": "benchmark",
        })  # fmt: skip
        names.append(name)
    return names


def all_live(running: Running, names: list[str], timeout_s: float) -> None:
    """Wait until every role of every deployment has a live worker."""
    waiting = list(names)
    deadline = time.monotonic() + timeout_s
    while waiting:
        waiting = [n for n in waiting if not live_roles(running, n) >= ROLES]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no live workers for {waiting} within {timeout_s:g} s")
        time.sleep(0.25)


def _command(pid: int) -> str:
    cmd = procstat.cmdline(pid)
    if "gateway.cli.main" in cmd:
        return "rdv " + cmd.split("gateway.cli.main", 1)[1].strip()
    return cmd.split(" ", 1)[0].rsplit("/", 1)[-1]


def memory(running: Running, samples: int = 3) -> dict[str, Any]:
    """RSS and PSS of every process; of ``samples`` a second apart, the one with the median
    total (a Redis rewrite's fork may double Redis for a moment)."""
    taken: list[tuple[float, list[dict[str, Any]]]] = []
    for k in range(samples):
        if k:
            time.sleep(1.0)
        members = running.tree.members()
        procs: list[dict[str, Any]] = [
            {
                "pid": pid,
                "component": name,
                "command": _command(pid)[:160],
                "rss_mb": round(
                    procstat.resident_once_bytes(pid, running.tree.parent_of.get(pid))
                    / procstat.MB,
                    1,
                ),
                "pss_mb": round(procstat.pss_bytes(pid) / procstat.MB, 1),
            }
            for pid, name in sorted(members.items())
        ]
        taken.append((sum(p["rss_mb"] for p in procs), procs))
    total, procs = sorted(taken, key=lambda t: t[0])[len(taken) // 2]
    by: dict[str, dict[str, float]] = {}
    for p in procs:
        part = by.setdefault(p["component"], {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0})
        part["processes"] += 1
        part["rss_mb"] = round(part["rss_mb"] + p["rss_mb"], 1)
        part["pss_mb"] = round(part["pss_mb"] + p["pss_mb"], 1)
    return {
        "rss_mb_total": round(total, 1),
        "pss_mb_total": round(sum(p["pss_mb"] for p in procs), 1),
        "processes": len(procs),
        "worker_processes": sum(not p["component"].startswith(NOT_WORKERS) for p in procs),
        "by_component": by,
        "by_process": procs,
        "redis_used_memory_mb": redis_used_memory_mb(running),
    }


def idle_cpu(running: Running, idle_s: float) -> dict[str, Any]:
    """CPU of every process over ``idle_s`` of no traffic, in % of one core."""
    a = procstat.TreeSample.take(running.tree)
    time.sleep(idle_s)
    b = procstat.TreeSample.take(running.tree)
    wall = b.t - a.t
    cpu = procstat.cpu_between(a, b)
    return {
        "wall_s": round(wall, 2),
        "cpu_pct": round(sum(cpu.values()) / wall * 100, 2),
        "cpu_pct_by_component": {k: round(v / wall * 100, 2) for k, v in sorted(cpu.items())},
        "machine_busy_pct": round((b.machine_busy_s - a.machine_busy_s) / wall * 100, 1),
    }


def _live_again(running: Running, names: list[str]) -> None:
    """After being held still: the heartbeats lapsed and the gateway's Redis commands in
    flight timed out meanwhile. Ready, every worker's heartbeat back, and still so half a
    second later, before any load."""
    deadline = time.monotonic() + 60.0
    while http_status(f"{running.base_url}/readyz") != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{running.name} not ready again within 60 s")
        time.sleep(0.25)
    all_live(running, names, timeout_s=60.0)
    time.sleep(0.5)
    all_live(running, names, timeout_s=60.0)


def alternate(
    many: Running, names: list[str], single: Running, duration_s: float, rounds: int
) -> dict[str, Any]:
    """c64 on the demo deployment of each system in turn, the other held still."""
    systems = {"many": (with_bodies(many, 1), names), "one": (with_bodies(single, 1), [DEPLOYMENT])}
    phases: dict[str, list[dict[str, Any]]] = {"many": [], "one": []}

    def measure(side: str, seconds: float) -> dict[str, Any]:
        other = systems["one" if side == "many" else "many"][0]
        running, deps = systems[side]
        with held_still(other):
            _live_again(running, deps)
            return phase(running, Load("closed", 64, duration_s=seconds))

    for side in systems:  # warm-up
        measure(side, min(2.0, duration_s))
    for round_no in range(rounds):
        for side in ("many", "one") if round_no % 2 == 0 else ("one", "many"):
            phases[side].append(measure(side, duration_s))
    ratios = [m["throughput_rps"] / o["throughput_rps"]
              for m, o in zip(phases["many"], phases["one"], strict=True)]  # fmt: skip
    return {"phases": phases, "rounds": [round(r, 3) for r in ratios],
            "ratio": round(statistics.median(ratios), 3)}  # fmt: skip


def start_both(
    ctx: AxisContext, names: tuple[str, str], settings: dict[str, str]
) -> tuple[Running, Running]:
    """Two ``rdv serve`` started side by side (each mostly waits for its children)."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ctx.start, name, settings) for name in names]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < 2:
        stop_all(started)
        raise next(e for f in futures if (e := f.exception()) is not None)
    return started[0], started[1]


def stop_all(systems: list[Running]) -> None:
    """Stopped side by side: each waits for its children's graceful exit."""
    with ThreadPoolExecutor(max(1, len(systems))) as pool:
        list(pool.map(lambda r: r.stop(), systems))


def measure_layout(ctx: AxisContext, layout: str | None) -> dict[str, Any]:
    """The deployments axis with one ``RDV_WORKER_LAYOUT`` (``None``: unset). The single-
    deployment server starts beside the other and is held still until the rounds."""
    opts = ctx.options
    settings = {} if layout is None else {"RDV_WORKER_LAYOUT": layout}
    tag = layout or "default"
    many, single = start_both(
        ctx, (f"deployments-{opts.deployments}-{tag}", f"single-deployment-{tag}"), settings
    )
    try:
        single_mem = memory(single, samples=1)
        with held_still(single):
            t0 = time.monotonic()
            names = create_deployments(many, ctx.models, opts.deployments)
            all_live(many, names, timeout_s=60.0 + 10.0 * opts.deployments)
            up_s = time.monotonic() - t0
            log(f"{len(names)} deployments live in {up_s:.0f} s ({tag} layout); settling")
            time.sleep(opts.settle_s)
            mem = memory(many, samples=3 if opts.settle_s >= 3 else 1)
            idle = idle_cpu(many, opts.idle_s)
        log(f"{len(names)} deployments: {mem['rss_mb_total']:.0f} MB RSS in "
            f"{mem['processes']} processes, idle CPU {idle['cpu_pct']:.1f} %")  # fmt: skip
        throughput = alternate(many, names, single, opts.duration_s, opts.rounds)
    finally:
        stop_all([many, single])
    return {
        "layout": layout,
        "env": settings,
        "deployments": len(names),
        "all_live_s": round(up_s, 1),
        "memory": mem,
        "idle": idle,
        "single_deployment_memory": single_mem,
        "throughput": throughput,
        "rss_mb_20_deployments": mem["rss_mb_total"],
        "pss_mb_20_deployments": mem["pss_mb_total"],
        "processes_20_deployments": mem["processes"],
        "idle_cpu_pct_20_deployments": idle["cpu_pct"],
        "throughput_20_deployments_vs_one": throughput["ratio"],
    }


def deployments_axis(ctx: AxisContext) -> dict[str, Any]:
    layout = ctx.options.layout
    layouts: list[str | None] = ["shared", "per-role"] if layout == "both" else [layout]
    out: dict[str, Any] = {"layouts": {}, "deployments_measured": ctx.options.deployments}
    for k, name in enumerate(layouts):
        figures = measure_layout(ctx, name)
        out["layouts"][name or "default"] = figures
        suffix = "_per_role" if k else ""
        for key in (*KEYS, *EXTRA_KEYS):
            out[key + suffix] = figures[key]
    out["deployments_layout"] = layout or "default"
    return out
