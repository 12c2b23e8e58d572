"""The soak's and the axes' arithmetic (``benchmarks/axis_soak.py``, ``axes_report.py``) on
made-up samples: which windows, which growth, which p99, which key meets its target."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.axes_report import AXIS_TARGETS, axis_ratios
from benchmarks.axis_soak import (
    latency_series,
    memory_growth,
    p99_between,
    window_cpu,
    windows,
)
from benchmarks.loadgen import ProcResult


def _sample(t_s: float, rss: dict[str, float], redis_mb: float | None) -> dict[str, Any]:
    return {"t_s": t_s, "rss_mb": rss, "rss_mb_total": sum(rss.values()),
            "redis_used_memory_mb": redis_mb}  # fmt: skip


def test_the_windows_are_the_minute_after_warmup_and_the_last_or_half_of_a_short_soak() -> None:
    assert windows(600, 60) == ((60, 120), (540, 600))
    assert windows(3, 1) == ((1, 2), (2, 3))


def test_growth_is_of_medians_per_process_and_the_largest_wins() -> None:
    """A one-sample spike in the first window moves no median; a process that restarted (a new
    pid) is listed apart, not compared."""
    samples = []
    for t in range(0, 20):
        worker = 100.0 if t < 10 else 120.0  # +20 % between the windows
        gateway = 300.0 if t != 2 else 900.0  # a spike inside the first window
        rss = {"worker:real:11": worker, "gateway:12": gateway}
        rss["logbin:13" if t < 10 else "logbin:14"] = 50.0  # restarted
        samples.append(_sample(float(t), rss, 10.0 + (t >= 10) * 0.5))
    out = memory_growth(samples, (0, 4), (15, 19))
    assert out["rss_growth_pct_by_process"] == {"gateway:12": 0.0, "worker:real:11": 20.0}
    assert out["soak_rss_growth_pct"] == 20.0 and out["largest"] == "worker:real:11"
    assert out["not_in_both_windows"] == ["logbin:13", "logbin:14"]
    assert out["soak_redis_memory_growth_pct"] == 5.0
    assert out["samples_in_windows"] == [5, 5]


def test_latency_is_cut_by_send_time() -> None:
    result = ProcResult()
    for k in range(300):  # 100 a second for 3 s; the last second twice as slow
        result.answered_at_s.append(k / 100)
        result.latencies_ms.append(10.0 if k < 200 else 20.0)
    result.failed_at_s.append(2.5)
    series = latency_series(result, 3.0, 1.0)
    assert [b["rps"] for b in series] == [100.0, 100.0, 100.0]
    assert [b["p99_ms"] for b in series] == [10.0, 10.0, 20.0]
    assert [b["failed"] for b in series] == [0, 0, 1]
    assert p99_between(result, (2.0, 3.0)) / p99_between(result, (1.0, 2.0)) == 2.0  # type: ignore[operator]
    assert p99_between(result, (5.0, 6.0)) is None


def test_a_windows_cpu_is_between_its_first_and_last_samples_per_answer() -> None:
    """Two requests a second; the gateway takes 1 ms of CPU a second (500 us a request), the
    machine 1.5 s a second (so 0.5 s elsewhere), steal 0.1 s a second."""
    result = ProcResult()
    for k in range(20):
        result.answered_at_s.append(k / 2)
        result.latencies_ms.append(5.0)
    samples = [{"t_s": float(t), "cpu_s": {"gateway": t * 0.001, "redis": t * 0.0002},
                "machine_busy_s": t * 1.5, "machine_steal_s": t * 0.1,
                "redis_persistence": {"forks": t // 4, "aof_delayed_fsync": 0}}
               for t in range(0, 11, 2)]  # fmt: skip
    out = window_cpu(samples, result, (2.0, 8.0))
    assert out is not None and out["from_s"] == 2.0 and out["to_s"] == 8.0
    assert out["answered"] == 12
    assert out["cpu_us_per_request"] == {"gateway": 500.0, "redis": 100.0}
    assert out["cpu_us_per_request_total"] == 600.0
    assert out["other_cpu_per_s"] == pytest.approx(1.5 - 0.0012, abs=1e-3)
    assert out["steal_cpu_per_s"] == 0.1
    assert out["redis_events"] == {"aof_delayed_fsync": 0, "forks": 2}  # forks at t 4 and 8
    assert window_cpu(samples, result, (3.0, 3.5)) is None  # no two samples inside


def test_every_issue_18_key_is_there_with_its_target_and_per_role_figures_beside() -> None:
    results = {"axes": {
        "deployments": {"rss_mb_20_deployments": 900.0, "idle_cpu_pct_20_deployments": 7.5,
                        "throughput_20_deployments_vs_one": 0.95,
                        "rss_mb_20_deployments_per_role": 2600.0, "deployments_layout": "both",
                        "deployments_measured": 20},
        "soak": {"soak_rss_growth_pct": 1.0, "soak_redis_memory_growth_pct": 12.0,
                 "soak_p99_last_vs_first": 1.1, "soak_errors": 0},
    }}  # fmt: skip
    ratios = axis_ratios(results)
    targets = ratios.pop("targets")
    assert set(AXIS_TARGETS) <= set(ratios) and set(AXIS_TARGETS) <= set(targets)
    assert ratios["throughput_c64_3challengers_vs_none"] is None  # not run
    assert targets["throughput_c64_3challengers_vs_none"]["met"] is None
    met = {k: t["met"] for k, t in targets.items()}
    assert met["rss_mb_20_deployments"] and not met["rss_mb_20_deployments_per_role"]
    assert not met["idle_cpu_pct_20_deployments"] and met["throughput_20_deployments_vs_one"]
    assert not met["soak_redis_memory_growth_pct"] and met["soak_errors"]
    assert ratios["deployments_layout"] == "both"


@pytest.mark.parametrize("errors,met", [(0, True), (1, False)])
def test_one_soak_error_misses_the_target(errors: int, met: bool) -> None:
    ratios = axis_ratios({"axes": {"soak": {"soak_errors": errors}}})
    assert ratios["targets"]["soak_errors"]["met"] is met


async def test_the_baseline_closes_each_connection_after_its_hundredth_request() -> None:
    """Told apart by client address: a connection's 100th answer says ``Connection: close``
    (uvicorn then closes it), another connection's count runs on its own, and a reconnect
    from the same address starts afresh."""
    from benchmarks.inprocess_app import REQUESTS_PER_CONNECTION, ReconnectEvery

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = ReconnectEvery(app)

    async def closes(client: tuple[str, int]) -> bool:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "client": client}
        await guard(scope, None, send)  # type: ignore[arg-type]
        assert sent[1]["body"] == b"ok"
        return (b"connection", b"close") in sent[0]["headers"]

    a, b = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
    assert [await closes(a) for _ in range(REQUESTS_PER_CONNECTION - 1)] == [False] * 99
    assert not await closes(b)
    assert await closes(a)
    assert not await closes(a)  # the reconnect's first
    assert [await closes(b) for _ in range(REQUESTS_PER_CONNECTION - 1)][-1]
