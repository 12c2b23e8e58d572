"""The soak axis of issue 18: does a long run at a steady load hold its memory and latency?

A fresh ``rdv serve``; its peak is a short c64 closed loop (``--peak-s``), then one open loop
at half that rate for ``--soak-s`` seconds (default 600; ``--soak-hour``: 3,600), sampling
every ``--soak-sample-s`` the RSS of each process and Redis's ``used_memory``. The first
``--soak-warmup-s`` (default 60) are warm-up. A *window* is the minute after the warm-up and
the last minute (each at most half of what follows the warm-up, for short soaks):

- ``soak_rss_growth_pct``: per process, the median RSS of the last window against the median
  of the first, in %; the largest over the processes present in both (medians, so that one
  sample caught mid-allocation does not decide; a process that restarted is listed apart);
- ``soak_redis_memory_growth_pct``: the same for Redis's ``used_memory``; beside it, without a
  target, ``soak_redis_memory_growth_pct_besides_outcomes``: the same less what the outcome
  store holds. That store (the answers kept for labels) fills by design up to
  ``RDV_FEEDBACK_MAX_MB``: 256 MB take about 16 minutes at 2,000 req/s, longer than the soak,
  so its growth would be a bound filling, not a leak. The soak's server therefore runs with
  ``--soak-feedback-mb`` (4 MB), full within the warm-up (``outcome_store_full_in_first_window``
  says whether it was); growth after it is what no bound holds;
- ``soak_p99_last_vs_first``: p99 of the requests sent in the last window over the first's;
- ``soak_errors``: requests that got no 200 (429s included: a refusal at half the peak is a
  failure here), over the whole soak.

The series (the samples, and per bucket of a few seconds the throughput, p50, p99 and
errors) stay in the results for a plot.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import redis

from benchmarks import procstat
from benchmarks.axis_common import (
    AxisContext,
    outcome_store_mb,
    phase,
    redis_persistence,
    redis_used_memory_mb,
    with_bodies,
)
from benchmarks.harness import log
from benchmarks.loadgen import Load, ProcResult, run_load
from benchmarks.systems import Running
from gateway.settings import Settings

SOAK_HOUR_S = 3600.0
FULL = 0.75
"""The outcome store counts as full at this share of its bound (``MEMORY USAGE`` samples its
hashes, and the store prunes in parts of 1/16 of the bound)."""


class Sampler:
    """Every ``every_s``, the RSS of each process (by ``component:pid``) and Redis's memory;
    and the CPU seconds since the start of each component and of the whole machine (so that
    a window's latency can be read against its own CPU a request and the machine's noise)."""

    def __init__(self, running: Running, every_s: float):
        self.running, self.every_s = running, every_s
        self.t0 = time.monotonic()
        self.next_at = 0.0
        self.samples: list[dict[str, Any]] = []
        self.cpu0: procstat.TreeSample | None = None

    def start(self) -> None:
        """At the load's go: times count from here, as the load generator's do."""
        self.t0 = time.monotonic()
        self.cpu0 = procstat.TreeSample.take(self.running.tree)
        self.tick()

    def tick(self) -> None:
        now = time.monotonic() - self.t0
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        cpu = procstat.TreeSample.take(self.running.tree)
        rss = {f"{name}:{pid}": round(procstat.rss_bytes(pid) / procstat.MB, 2)
               for pid, name in cpu.component.items()}  # fmt: skip
        try:
            used = redis_used_memory_mb(self.running)
            outcomes = outcome_store_mb(self.running)
            persistence = redis_persistence(self.running)
        except (OSError, redis.RedisError):
            used = outcomes = persistence = None
        base = self.cpu0 or cpu
        self.samples.append({"t_s": round(now, 2), "rss_mb": rss,
                             "rss_mb_total": round(sum(rss.values()), 1),
                             "redis_used_memory_mb": used,
                             "redis_outcome_store_mb": outcomes,
                             "redis_persistence": persistence,
                             "cpu_s": procstat.cpu_between(base, cpu),
                             "machine_busy_s": round(cpu.machine_busy_s - base.machine_busy_s, 3),
                             "machine_steal_s": round(
                                 cpu.machine_steal_s - base.machine_steal_s, 3)})  # fmt: skip


def window_cpu(
    samples: list[dict[str, Any]], result: ProcResult, window: tuple[float, float]
) -> dict[str, Any] | None:
    """Between the first and last samples inside ``window``: CPU µs an answered request of
    each component, and the machine's CPU that went elsewhere (the load generator's included)
    and to steal, in seconds a second. If every component's cost a request grew alike while
    the latency grew, the machine slowed; if one grew alone, that process did. Beside them,
    Redis's forks (AOF rewrites) and delayed AOF fsyncs in the window (``redis_events``)."""
    inside = [s for s in samples if window[0] <= s["t_s"] <= window[1] and "cpu_s" in s]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    at = np.frombuffer(result.answered_at_s, dtype=np.float64)
    answered = int(((at >= a["t_s"]) & (at < b["t_s"])).sum())
    span = b["t_s"] - a["t_s"]
    if not answered or span <= 0:
        return None
    ours = {n: b["cpu_s"].get(n, 0.0) - a["cpu_s"].get(n, 0.0) for n in b["cpu_s"]}
    busy = b["machine_busy_s"] - a["machine_busy_s"]
    before, after = a.get("redis_persistence"), b.get("redis_persistence")
    redis_events = ({k: after[k] - before[k] for k in sorted(after) if k in before}
                    if before and after else None)  # fmt: skip
    return {
        "from_s": a["t_s"],
        "to_s": b["t_s"],
        "answered": answered,
        "cpu_us_per_request": {n: round(v / answered * 1e6, 1) for n, v in sorted(ours.items())},
        "cpu_us_per_request_total": round(sum(ours.values()) / answered * 1e6, 1),
        "other_cpu_per_s": round((busy - sum(ours.values())) / span, 3),
        "steal_cpu_per_s": round((b["machine_steal_s"] - a["machine_steal_s"]) / span, 3),
        "redis_events": redis_events,
    }


def growth_pct(first: list[float], last: list[float]) -> float | None:
    if not first or not last or statistics.median(first) <= 0:
        return None
    return round((statistics.median(last) / statistics.median(first) - 1) * 100, 2)


def windows(soak_s: float, warmup_s: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first minute after the warm-up and the last minute (each at most half the rest)."""
    width = min(60.0, (soak_s - warmup_s) / 2)
    return (warmup_s, warmup_s + width), (soak_s - width, soak_s)


def memory_growth(
    samples: list[dict[str, Any]], first: tuple[float, float], last: tuple[float, float]
) -> dict[str, Any]:
    def within(w: tuple[float, float]) -> list[dict[str, Any]]:
        return [s for s in samples if w[0] <= s["t_s"] <= w[1]]

    a, b = within(first), within(last)
    names = {n for s in a for n in s["rss_mb"]} & {n for s in b for n in s["rss_mb"]}
    by_process = {
        n: growth_pct([s["rss_mb"][n] for s in a if n in s["rss_mb"]],
                      [s["rss_mb"][n] for s in b if n in s["rss_mb"]])
        for n in sorted(names)
    }  # fmt: skip
    measured = {n: g for n, g in by_process.items() if g is not None}
    redis_a = [s["redis_used_memory_mb"] for s in a if s["redis_used_memory_mb"] is not None]
    redis_b = [s["redis_used_memory_mb"] for s in b if s["redis_used_memory_mb"] is not None]

    def besides_outcomes(window: list[dict[str, Any]]) -> list[float]:
        return [s["redis_used_memory_mb"] - s["redis_outcome_store_mb"] for s in window
                if s["redis_used_memory_mb"] is not None
                and s.get("redis_outcome_store_mb") is not None]  # fmt: skip

    return {
        "samples_in_windows": [len(a), len(b)],
        "rss_growth_pct_by_process": by_process,
        "largest": max(measured, key=lambda n: measured[n]) if measured else None,
        "soak_rss_growth_pct": max(measured.values()) if measured else None,
        "total_rss_growth_pct": growth_pct(
            [s["rss_mb_total"] for s in a], [s["rss_mb_total"] for s in b]
        ),
        "not_in_both_windows": sorted(
            ({n for s in a for n in s["rss_mb"]} | {n for s in b for n in s["rss_mb"]}) - names
        ),
        "soak_redis_memory_growth_pct": growth_pct(redis_a, redis_b),
        "soak_redis_memory_growth_pct_besides_outcomes": growth_pct(
            besides_outcomes(a), besides_outcomes(b)
        ),
        "redis_outcome_store_mb": [
            _median_of(a, "redis_outcome_store_mb"),
            _median_of(b, "redis_outcome_store_mb"),
        ],
    }


def _median_of(window: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in window if s.get(key) is not None]
    return statistics.median(values) if values else None


def latency_series(result: ProcResult, soak_s: float, bucket_s: float) -> list[dict[str, Any]]:
    """Per bucket of ``bucket_s`` (by send time): answers per second, p50, p99, failures."""
    at = np.frombuffer(result.answered_at_s, dtype=np.float64)
    ms = np.frombuffer(result.latencies_ms, dtype=np.float64)
    failed = np.frombuffer(result.failed_at_s, dtype=np.float64)
    series = []
    for start in np.arange(0.0, soak_s, bucket_s):
        mask = (at >= start) & (at < start + bucket_s)
        chunk = ms[mask]
        series.append({
            "t_s": round(float(start), 2),
            "rps": round(chunk.size / bucket_s, 1),
            "p50_ms": round(float(np.percentile(chunk, 50)), 3) if chunk.size else None,
            "p99_ms": round(float(np.percentile(chunk, 99)), 3) if chunk.size else None,
            "failed": int(((failed >= start) & (failed < start + bucket_s)).sum()),
        })  # fmt: skip
    return series


def p99_between(result: ProcResult, window: tuple[float, float]) -> float | None:
    at = np.frombuffer(result.answered_at_s, dtype=np.float64)
    ms = np.frombuffer(result.latencies_ms, dtype=np.float64)
    chunk = ms[(at >= window[0]) & (at < window[1])]
    return round(float(np.percentile(chunk, 99)), 3) if chunk.size else None


def soak_axis(ctx: AxisContext) -> dict[str, Any]:
    opts = ctx.options
    soak_s, warmup_s = opts.soak_s, min(opts.soak_warmup_s, opts.soak_s / 2)
    feedback_mb = opts.soak_feedback_mb
    settings = {"RDV_FEEDBACK_MAX_MB": f"{feedback_mb:g}"} if feedback_mb else {}
    running = ctx.start("soak", settings)
    try:
        running = with_bodies(running, 1)
        phase(running, Load("closed", 64, duration_s=min(2.0, opts.peak_s)))  # warm-up
        peak = phase(running, Load("closed", 64, duration_s=opts.peak_s))
        rate = round(peak["throughput_rps"] / 2, 1)
        log(f"soak: {soak_s:g} s at {rate:g} req/s (half the c64 peak)")
        sampler = Sampler(running, opts.soak_sample_s)
        cpu0 = procstat.TreeSample.take(running.tree)
        load = Load("open", rate=rate, duration_s=soak_s)
        result, loadgen_cpu = run_load(running.target, load, 2, on_start=sampler.start,
                                       while_running=sampler.tick)  # fmt: skip
        cpu = procstat.cpu_between(cpu0, procstat.TreeSample.take(running.tree))
        sampler.next_at = 0.0
        sampler.tick()
    finally:
        running.stop()
    first, last = windows(soak_s, warmup_s)
    growth = memory_growth(sampler.samples, first, last)
    bound_mb = feedback_mb or Settings.model_fields["feedback_max_mb"].default
    held_mb = growth["redis_outcome_store_mb"][0]
    growth["outcome_store_full_in_first_window"] = bool(held_mb and held_mb >= FULL * bound_mb)
    if not growth["outcome_store_full_in_first_window"]:
        log(f"soak: the outcome store held {held_mb} MB of its {bound_mb:g} after the warm-up: "
            "the Redis growth includes its filling")  # fmt: skip
    p99_first, p99_last = p99_between(result, first), p99_between(result, last)
    cpu_windows = {"first": window_cpu(sampler.samples, result, first),
                   "last": window_cpu(sampler.samples, result, last)}  # fmt: skip
    ok = len(result.latencies_ms)
    errors = result.sent - ok
    log(f"soak: {ok} answered, {errors} not; RSS growth {growth['soak_rss_growth_pct']} % "
        f"({growth['largest']}), Redis {growth['soak_redis_memory_growth_pct']} %, "
        f"p99 {p99_first} -> {p99_last} ms; CPU a request "
        f"{(cpu_windows['first'] or {}).get('cpu_us_per_request_total')} -> "
        f"{(cpu_windows['last'] or {}).get('cpu_us_per_request_total')} us, other CPU "
        f"{(cpu_windows['first'] or {}).get('other_cpu_per_s')} -> "
        f"{(cpu_windows['last'] or {}).get('other_cpu_per_s')} s/s, Redis forks and delayed "
        f"fsyncs {(cpu_windows['first'] or {}).get('redis_events')} -> "
        f"{(cpu_windows['last'] or {}).get('redis_events')}")  # fmt: skip
    return {
        "soak_s": soak_s,
        "warmup_s": warmup_s,
        "settings": settings,
        "windows_s": {"first": list(first), "last": list(last)},
        "peak": peak,
        "rate": rate,
        "sent": result.sent,
        "ok": ok,
        "statuses": dict(result.statuses),
        "cpu_s": {**cpu, "total": round(sum(cpu.values()), 2)},
        "loadgen_cpu_s": round(sum(loadgen_cpu), 2),
        "p99_ms": {"first": p99_first, "last": p99_last},
        "cpu_windows": cpu_windows,
        "memory": growth,
        "samples": sampler.samples,
        "latency_series": latency_series(result, soak_s, min(10.0, max(1.0, soak_s / 60))),
        "soak_rss_growth_pct": growth["soak_rss_growth_pct"],
        "soak_redis_memory_growth_pct": growth["soak_redis_memory_growth_pct"],
        "soak_redis_memory_growth_pct_besides_outcomes": growth[
            "soak_redis_memory_growth_pct_besides_outcomes"
        ],
        "soak_p99_last_vs_first": (
            round(p99_last / p99_first, 3) if p99_first and p99_last is not None else None
        ),
        "soak_errors": errors,
    }
