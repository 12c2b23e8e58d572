"""The benchmark harness works end to end: about a second of load against the in-process
baseline, results written as JSON and markdown. Benchmarks are not tests: nothing here asserts
a timing, only that every figure is there and every request was answered."""

from __future__ import annotations

import json
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
        "--loadgen-procs", "2", "--rounds", "2", "--no-plot", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]

    [result] = out.glob("*.json")
    doc = json.loads(result.read_text())
    assert result.with_suffix(".md").read_text().startswith("Run ")
    assert {"date", "commit", "machine", "config", "systems", "ratios"} <= set(doc)
    assert doc["loadgen_calibration"]["ok"] > 0
    assert set(doc["ratios"]) >= RATIOS

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
