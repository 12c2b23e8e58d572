"""One load against a running system, and every figure of it: throughput, latency and
refusals from the load generator; CPU of the system's processes, of the load generator, of the
harness and of the rest of the machine; Redis's commands and bytes per request.

Each load ``benchmarks.run`` measures is one ``run_phase``; so is each of the cost axes'
``axis_common.phase`` (the soak's long open loop samples on its own)."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Any

from benchmarks import procstat, redisstat
from benchmarks.harness import log
from benchmarks.loadgen import Load, run_load
from benchmarks.report import latency_figures
from benchmarks.systems import Running


def run_phase(running: Running, load: Load, procs: int) -> dict[str, Any]:
    tree = running.tree
    marks: dict[str, Any] = {}

    def on_start() -> None:
        marks["self"] = resource.getrusage(resource.RUSAGE_SELF)
        marks["a"] = procstat.TreeSample.take(tree)
        marks["redis"] = _redis_sample(running)

    result, loadgen_cpu = run_load(running.target, load, procs, on_start=on_start)
    b = procstat.TreeSample.take(tree)
    redis_after = _redis_sample(running)
    me = resource.getrusage(resource.RUSAGE_SELF)
    a, me0 = marks["a"], marks["self"]
    harness_cpu = (me.ru_utime - me0.ru_utime) + (me.ru_stime - me0.ru_stime)
    cpu = procstat.cpu_between(a, b)
    server_cpu = sum(cpu.values())
    lg_cpu = sum(loadgen_cpu)
    ok = len(result.latencies_ms)
    refused = len(result.refused_ms)
    busy = b.machine_busy_s - a.machine_busy_s
    redis_figures = None
    if marks.get("redis") is not None and redis_after is not None:
        redis_figures = redisstat.delta(marks["redis"], redis_after, ok)
    return {
        "mode": load.mode,
        "concurrency": load.concurrency if load.mode == "closed" else None,
        "rate": load.rate if load.mode == "open" else None,
        "duration_s": load.duration_s,
        "sent": result.sent,
        "ok": ok,
        "refused": refused,
        "errors": result.sent - ok - refused,
        "statuses": dict(result.statuses),
        "throughput_rps": round(ok / result.elapsed_s, 1),
        "refused_rps": round(refused / result.elapsed_s, 1),
        "latency_ms": latency_figures(result.latencies_ms),
        "refusal_latency_ms": latency_figures(result.refused_ms),
        "cpu_s": {**cpu, "total": round(server_cpu, 3)},
        "cpu_us_per_request": round(server_cpu / ok * 1e6, 1) if ok else None,
        "cpu_busiest_share": procstat.busiest_share(a, b),
        "loadgen": {
            "procs": len(loadgen_cpu),
            "cpu_s": round(lg_cpu, 3),
            "cpu_us_per_request": round(lg_cpu / max(result.sent, 1) * 1e6, 1),
            "cpu_utilisation": round(lg_cpu / (len(loadgen_cpu) * load.duration_s), 3),
            "send_lag_ms": _lag(result.send_lag_ms),
        },
        "machine": {
            "wall_s": round(b.t - a.t, 3),
            "busy_cpu_s": round(busy, 3),
            "steal_cpu_s": round(b.machine_steal_s - a.machine_steal_s, 3),
            "harness_cpu_s": round(harness_cpu, 3),
            "other_cpu_s": round(busy - server_cpu - lg_cpu - harness_cpu, 3),
        },
        "redis": redis_figures,
    }


def _redis_sample(running: Running) -> dict[redisstat.Node, redisstat.NodeSample] | None:
    if not running.redis_nodes:
        return None
    try:
        return redisstat.sample(running.redis_nodes)
    except Exception as exc:  # a figure missing must not sink the phase
        log(f"{running.name}: no Redis counts: {exc}")
        return None


def _lag(lags_ms: Sequence[float]) -> dict[str, float] | None:
    if not lags_ms:
        return None
    figures = latency_figures(lags_ms)
    return {k: figures[k] for k in ("p50", "p99", "max")}
