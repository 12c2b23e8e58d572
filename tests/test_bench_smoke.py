"""The benchmark harness works end to end: about a second of load against the in-process
baseline, results written as JSON and markdown. Benchmarks are not tests: nothing here asserts
a timing, only that every figure is there and every request was answered."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RATIOS = {
    "throughput_c64_vs_inprocess",
    "throughput_c64_vs_peer",
    "added_p50_ms_c1",
    "p99_c64_vs_inprocess",
    "rss_mb_total",
}


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the harness reads /proc")
def test_bench_harness_runs_against_the_inprocess_baseline(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    model = demo_data_dir / "models" / "breast-cancer" / "2" / "model.onnx"
    out = tmp_path / "results"
    argv = [
        sys.executable, "-m", "benchmarks.run", "--systems", "inprocess", "--model", str(model),
        "--duration", "0.3", "--warmup", "0.2", "--concurrency", "1,4", "--rate", "50",
        "--loadgen-procs", "2", "--rounds", "2", "--no-plot", "--out", str(out), "--axes", "none",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]

    [result] = out.glob("*.json")
    doc = json.loads(result.read_text())
    assert result.with_suffix(".md").read_text().startswith("Run ")
    assert {"date", "commit", "machine", "config", "systems", "ratios"} <= set(doc)
    assert doc["loadgen_calibration"]["ok"] > 0
    assert set(doc["ratios"]) >= RATIOS
    assert doc["axes"] == {} and doc["ratios"]["soak_errors"] is None  # --axes none: keys, no run

    system = doc["systems"]["inprocess"]
    assert system["labels_agree_with_onnxruntime"]
    assert system["processes"] >= 3  # the uvicorn master and its two workers
    assert system["rss_mb"]["peak_total"] > 0
    assert set(system["phases"]) == {"c1", "c4", "open50"}
    for phase in system["phases"].values():
        assert phase["ok"] > 0 and phase["errors"] == 0, phase["statuses"]
        assert phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"]
        assert phase["cpu_s"]["total"] >= 0
        assert phase["loadgen"]["procs"] >= 1
    assert system["phases"]["c4"]["loadgen"]["procs"] == 2
    # Two rounds: each load reports one of them whole and lists both.
    assert system["rounds"] == 2
    for phase in system["phases"].values():
        assert len(phase["rounds"]["throughput_rps"]) == 2
        assert phase["throughput_rps"] in phase["rounds"]["throughput_rps"]


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the harness reads /proc")
def test_bench_harness_runs_rdv_serve_on_a_local_cluster(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    """The ``gateway-cluster-replicated`` system (``gateway-cluster`` is the same without
    replicas): a three-master cluster started beside ``rdv serve``, its six nodes counted
    as the system's processes, Redis commands counted on every master,
    and every node stopped with the system."""
    out = tmp_path / "results"
    argv = [
        sys.executable, "-m", "benchmarks.run", "--systems", "gateway-cluster-replicated",
        "--rdv-models", str(demo_data_dir / "models"), "--duration", "0.5", "--warmup", "0.2",
        "--concurrency", "4", "--rate", "0", "--rounds", "1", "--no-plot", "--no-calibrate",
        "--out", str(out), "--axes", "none",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]

    [result] = out.glob("*.json")
    doc = json.loads(result.read_text())
    system = doc["systems"]["gateway-cluster-replicated"]
    assert system["labels_agree_with_onnxruntime"]
    assert {"redis", "redis-replica"} <= set(system["process_components"])
    phase = system["phases"]["c4"]
    assert phase["ok"] > 0 and phase["errors"] == 0, phase["statuses"]
    redis = phase["redis"]
    assert redis["masters"] == 3 and len(redis["commands_by_master"]) == 3
    assert redis["commands_per_request"] > 1  # at least the request's XADD and its decision
    assert redis["commands_per_request_by_command"]["xadd"] >= 1
    assert redis["repl_bytes"] > 0  # the replicas followed
    assert phase["cpu_s"]["redis"] > 0
    ports = system["info"]["cluster"]["masters"] + system["info"]["cluster"]["replicas"]
    assert len(ports) == 6 and max(ports) < 55536
    for port in ports:  # every node is gone with the system
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port


def test_the_cluster_target_pairs_rounds_of_the_cluster_without_replicas() -> None:
    """``throughput_c64_cluster_vs_single`` is the median of each round's own ratio of the
    three-master cluster without replicas to the single node; the replicated cluster's
    figure stands beside it, without a target."""
    from benchmarks.report import ratios

    def system(rps: list[float], commands: float) -> dict[str, object]:
        median = sorted(rps)[len(rps) // 2]
        redis = {"commands_per_request": commands, "bytes_per_request": 10.0}
        phase = {"throughput_rps": median, "rounds": {"throughput_rps": rps}, "redis": redis}
        return {"phases": {"c64": phase}}

    results = {"systems": {
        "gateway": system([1000.0, 1200.0, 800.0], 2.8),
        "gateway-cluster": system([900.0, 900.0, 900.0], 2.6),
        "gateway-cluster-replicated": system([700.0, 600.0, 600.0], 2.7),
    }}  # fmt: skip
    r = ratios(results)
    assert r["throughput_c64_cluster_vs_single_rounds"] == [0.9, 0.75, 1.125]
    assert r["throughput_c64_cluster_vs_single"] == 0.9
    assert r["targets"]["throughput_c64_cluster_vs_single"]["met"] is True
    assert r["throughput_c64_cluster_replicated_vs_single"] == 0.7
    assert "throughput_c64_cluster_replicated_vs_single" not in r["targets"]
    assert r["redis_commands_per_request_cluster"] == 2.6
    assert r["redis_commands_per_request_cluster_replicated"] == 2.7
    assert r["redis_commands_per_request_single"] == 2.8


def test_the_inprocess_targets_pair_each_round_with_its_own_baseline() -> None:
    """``added_p50_ms_c1`` and the c64 ratios to the in-process baseline are the median of each
    round's own comparison (the two ran one after the other): the median-throughput rounds of
    the two could come from different rounds, a fast one of the baseline beside a slow one of
    the gateway (0.722 where the rounds read 0.878 / 0.615 / 0.637)."""
    from benchmarks.report import ratios

    def system(c1: list[float], p50: list[float], c64: list[float], p99: list[float]) -> dict:
        def phase(rps: list[float], p50s: list[float], p99s: list[float]) -> dict:
            i = sorted(range(len(rps)), key=rps.__getitem__)[len(rps) // 2]
            return {"throughput_rps": rps[i], "latency_ms": {"p50": p50s[i], "p99": p99s[i]},
                    "rounds": {"throughput_rps": rps, "p50_ms": p50s, "p99_ms": p99s}}  # fmt: skip

        return {"phases": {"c1": phase(c1, p50, [2.0] * 3),
                           "c64": phase(c64, [5.0] * 3, p99)}}  # fmt: skip

    results = {"systems": {
        "gateway": system([676.8, 654.3, 723.6], [1.2571, 1.2912, 1.172],
                          [3000.0, 3200.0, 3100.0], [30.0, 20.0, 25.0]),
        "inprocess": system([2363.3, 1453.2, 1741.0], [0.3795, 0.676, 0.5351],
                            [4000.0, 3600.0, 3800.0], [20.0, 20.0, 20.0]),
    }}  # fmt: skip
    r = ratios(results)
    assert r["added_p50_ms_c1_rounds"] == [0.8776, 0.6152, 0.6369]
    assert r["added_p50_ms_c1"] == 0.6369 and r["targets"]["added_p50_ms_c1"]["met"] is True
    assert r["added_p50_ms_c1_of_median_rounds"] == pytest.approx(1.2571 - 0.5351, abs=1e-4)
    assert r["throughput_c64_vs_inprocess_rounds"] == [0.75, 0.889, 0.816]
    assert r["throughput_c64_vs_inprocess"] == 0.816
    assert r["p99_c64_vs_inprocess"] == 1.25
    assert r["p99_c64_vs_inprocess_rounds"] == [1.5, 1.0, 1.25]
    one = {name: {"phases": {k: {**ph, "rounds": {}} for k, ph in s["phases"].items()}}
           for name, s in results["systems"].items()}  # fmt: skip
    assert ratios({"systems": one})["added_p50_ms_c1"] == r["added_p50_ms_c1_of_median_rounds"]


async def test_the_load_generator_counts_refusals_apart_and_reopens_a_closed_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """429s are refusals with latencies of their own, not errors; an answer that says
    ``Connection: close`` is counted and the next request goes on a new connection."""
    import asyncio
    import time

    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is not an installed package
    from benchmarks.loadgen import ProcResult, Target, closed_conn

    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ]
    served = [0]
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            answer = answers[served[0] % 2]
            served[0] += 1
            writer.write(answer)
            await writer.drain()
            if b"close" in answer:
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = Target("127.0.0.1", port, "/p", (b"{}",))
    out = ProcResult()
    async with server:
        await closed_conn(target, target.requests(), 0, time.perf_counter() + 0.3, out, None)
        for writer in writers:  # none left open for after the loop (a ResourceWarning)
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    assert not [s for s in out.statuses if s.startswith("error")], out.statuses
    assert out.statuses["429"] == len(out.refused_ms) > 0
    assert out.statuses["200"] == len(out.latencies_ms) > 0
    assert len(writers) >= out.statuses["200"]  # one new connection after each close


def _run_axes(argv: list[str], timeout_s: float = 100.0) -> subprocess.CompletedProcess[str]:
    """``benchmarks.axes`` within the test's own timeout: past ``timeout_s`` it gets SIGTERM,
    on which it stops every ``rdv serve`` it started (a SIGKILL would leave them running)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        err += f"\n(stopped after {timeout_s:g} s)"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the harness reads /proc")
def test_the_cost_axes_run_for_a_second(tmp_path: Path, demo_data_dir: Path) -> None:
    """The challengers and rows axes of issue 18 (``benchmarks.axes``): a second of load per
    phase on one ``rdv serve``; every ratio there, every request answered."""
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "benchmarks.axes", "--axes", "challengers,rows",
            "--duration", "0.5", "--rounds", "1", "--models", str(demo_data_dir / "models"),
            "--out", str(out)]  # fmt: skip
    done = _run_axes(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = out.glob("axes-*.json")
    doc = json.loads(result.read_text())
    measured = {"throughput_c64_3challengers_vs_none", "rows100_vs_inprocess",
                "added_p50_ms_c1_rows100"}  # fmt: skip
    assert all(isinstance(doc["ratios"][k], float) for k in measured), doc["ratios"]
    assert all(doc["ratios"][k] is None for k in ISSUE_18_KEYS - measured), doc["ratios"]
    assert set(doc["ratios"]["targets"]) == ISSUE_18_KEYS
    phases = [p for axis in doc["axes"].values() for side in axis["phases"].values() for p in side]
    assert len(phases) == 6 and all(p["ok"] > 0 and p["errors"] == 0 for p in phases), phases
    assert all(p["rss_mb_after"] > 0 for p in phases)
    shares = doc["axes"]["rows"]["rounds"]["busiest_share_c8"]  # two processes each side
    assert all(0.5 <= s <= 1.0 for side in shares.values() for s in side), shares


ISSUE_18_KEYS = {
    "throughput_c64_3challengers_vs_none", "rows100_vs_inprocess", "added_p50_ms_c1_rows100",
    "rss_mb_20_deployments", "idle_cpu_pct_20_deployments", "throughput_20_deployments_vs_one",
    "soak_rss_growth_pct", "soak_p99_last_vs_first", "soak_redis_memory_growth_pct",
    "soak_errors",
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the harness reads /proc")
def test_the_deployments_and_soak_axes_run_for_a_second(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    """Issue 18's deployments axis on 3 deployments (each with its own two models, every role
    live, the single-deployment server held still while the other is measured) and a soak of
    3 s after a 1 s warm-up: every key there with a sane value, every request answered."""
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "benchmarks.axes", "--axes", "deployments,soak",
            "--deployments", "3", "--duration", "0.5", "--rounds", "1", "--settle-s", "0.5",
            "--idle-s", "0.5", "--soak-s", "3", "--soak-warmup-s", "1", "--soak-sample-s", "0.25",
            "--peak-s", "0.5", "--models", str(demo_data_dir / "models"),
            "--out", str(out)]  # fmt: skip
    done = _run_axes(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = out.glob("axes-*.json")
    doc = json.loads(result.read_text())
    ratios = doc["ratios"]
    measured = {k for k in ISSUE_18_KEYS if k.startswith("soak") or "deployments" in k}
    assert all(isinstance(ratios[k], int | float) for k in measured), ratios
    assert ratios["deployments_layout"] == "default" and ratios["deployments_measured"] == 3

    dep = doc["axes"]["deployments"]["layouts"]["default"]
    mem = dep["memory"]
    assert dep["deployments"] == 3 and mem["processes"] == len(mem["by_process"])
    assert {"supervisor", "redis", "gateway", "logbin"} <= set(mem["by_component"])
    assert mem["worker_processes"] >= 2  # real and canary at least: answering apart from shadow
    assert ratios["rss_mb_20_deployments"] == pytest.approx(
        sum(p["rss_mb"] for p in mem["by_process"]), abs=0.5
    )
    assert ratios["rss_mb_20_deployments"] > dep["single_deployment_memory"]["rss_mb_total"]
    assert 0 <= ratios["idle_cpu_pct_20_deployments"] < 100 * (os.cpu_count() or 1)
    assert ratios["processes_20_deployments"] == mem["processes"]
    thr = dep["throughput"]["phases"]
    assert all(p["ok"] > 0 and p["errors"] == 0 for side in thr.values() for p in side), thr
    assert ratios["throughput_20_deployments_vs_one"] == pytest.approx(
        thr["many"][0]["throughput_rps"] / thr["one"][0]["throughput_rps"], abs=1e-3
    )

    soak = doc["axes"]["soak"]
    assert ratios["soak_errors"] == 0 and soak["ok"] == soak["sent"] > 0, soak["statuses"]
    assert soak["rate"] == pytest.approx(soak["peak"]["throughput_rps"] / 2, abs=0.1)
    assert len(soak["samples"]) >= 6 and all(s["redis_used_memory_mb"] > 0 for s in soak["samples"])
    assert soak["samples"][-1]["redis_outcome_store_mb"] > 0  # the answers kept for labels
    assert soak["settings"] == {"RDV_FEEDBACK_MAX_MB": "4"}  # bounded to fill in the warm-up
    last = soak["cpu_windows"]["last"]  # the window's own CPU, to tell its noise from ours
    assert last["answered"] > 0 and last["cpu_us_per_request"]["gateway"] > 0, last
    assert set(last["redis_events"]) == {"forks", "aof_delayed_fsync"}, last
    assert all(v >= 0 for v in last["redis_events"].values()), last
    assert last["cpu_us_per_request_total"] == pytest.approx(
        sum(last["cpu_us_per_request"].values()), abs=1.0
    )
    assert isinstance(soak["memory"]["outcome_store_full_in_first_window"], bool)
    assert isinstance(ratios["soak_redis_memory_growth_pct_besides_outcomes"], float)
    assert [b["t_s"] for b in soak["latency_series"]] == [0.0, 1.0, 2.0]
    assert sum(b["rps"] for b in soak["latency_series"]) == pytest.approx(soak["ok"], rel=0.01)
    assert soak["memory"]["soak_rss_growth_pct"] == max(
        v for v in soak["memory"]["rss_growth_pct_by_process"].values() if v is not None
    )
    assert 0 < ratios["soak_p99_last_vs_first"] < 100
    assert ratios["targets"]["soak_errors"]["met"] is True
    pids = {p["pid"] for p in mem["by_process"]}
    pids |= {int(name.rsplit(":", 1)[1]) for s in soak["samples"] for name in s["rss_mb"]}
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # every server stopped


@pytest.mark.integration
def test_the_job_burst_measures_realtime_quiet_and_during_a_burst(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    """``benchmarks.job_burst`` for a few seconds: realtime answered on both sides, jobs
    accepted, the ratios there."""
    out = tmp_path / "burst.json"
    argv = [sys.executable, "-m", "benchmarks.job_burst", "--connections", "2", "--rows", "200",
            "--duration", "3", "--quiet", "0.5", "--rounds", "1",
            "--models", str(demo_data_dir / "models"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [one] = json.loads(out.read_text())["rounds"]
    assert one["quiet_ms"]["n"] > 5 and one["burst_ms"]["n"] > 5, one
    assert set(one["burst_statuses"]) == {"200"} and one["submissions"]["accepted"] > 0, one
    assert one["p50_burst_vs_quiet"] > 0 and one["p99_burst_vs_quiet"] > 0
