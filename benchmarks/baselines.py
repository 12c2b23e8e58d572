"""The baselines ``rdv serve`` is compared against, each started as real processes on a free
port like the systems of ``benchmarks.systems``: the in-process FastAPI app, MLServer (installed
by the benchmark into ``benchmarks/.venv-mlserver``, ``benchmarks.venvs``), and the echo server
that calibrates the load generator."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.loadgen import Target
from benchmarks.systems import (
    PREDICT_PATH,
    REPO,
    Running,
    clean_env,
    free_port,
    gateway_labels,
    instances_body,
    launch,
    wait_ready,
)
from benchmarks.venvs import ensure_mlserver, mlserver_version

MLSERVER_MODEL = "breast-cancer"


def _classify_uvicorn(cmd: str) -> str:
    return "resource-tracker" if "resource_tracker" in cmd else "uvicorn-worker"


def start_inprocess(
    model_path: Path, log_dir: Path, processes: int = 2, timeout_s: float = 60.0
) -> Running:
    """The minimal FastAPI app with onnxruntime in-process, ``processes`` uvicorn workers."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.inprocess_app:create_app",
        "--factory",
        "--app-dir",
        str(REPO),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(processes),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    log_path = log_dir / "inprocess.log"
    proc, log = launch(argv, clean_env(BENCH_MODEL_PATH=str(model_path)), log_path)
    running = Running(
        name="inprocess",
        proc=proc,
        base_url=f"http://127.0.0.1:{port}",
        target=Target("127.0.0.1", port, PREDICT_PATH, ()),
        classify=_classify_uvicorn,
        root_name="uvicorn-master",
        body=instances_body,
        labels=gateway_labels,
        log_path=log_path,
        log_file=log,
        info={"command": "uvicorn benchmarks.inprocess_app --workers", "processes": processes},
    )
    return wait_ready(running, f"{running.base_url}/healthz", timeout_s)


def _mlserver_body(row: list[float]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]
    }


def _mlserver_labels(doc: Any) -> list[int]:
    out = {o["name"]: o for o in doc["outputs"]}
    return [int(v) for v in out["label"]["data"]]


def _classify_mlserver(cmd: str) -> str:
    return "resource-tracker" if "resource_tracker" in cmd else "inference-worker"


def start_mlserver(
    model_path: Path,
    work_dir: Path,
    log_dir: Path,
    parallel_workers: int = 1,
    timeout_s: float = 120.0,
    log: Callable[[str], None] = print,
) -> Running:
    """MLServer (its defaults, less the access log) with the custom onnxruntime runtime."""
    exe = ensure_mlserver(log)
    port = free_port()
    model_dir = work_dir / "models" / MLSERVER_MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_path, model_dir / "model.onnx")
    shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), model_dir / "mlserver_runtime.py")
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,  # debug (the default) writes an access log line per request
        "parallel_workers": parallel_workers,
        "metrics_dir": str(work_dir / ".metrics"),
        "environments_dir": str(work_dir / ".envs"),
    }
    (work_dir / "models" / "settings.json").write_text(json.dumps(settings, indent=1))
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_runtime.OnnxClassifierRuntime",
        "parameters": {"uri": "./model.onnx", "version": "2"},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    log_path = log_dir / "mlserver.log"
    proc, out = launch(
        [str(exe), "start", str(work_dir / "models")], clean_env(), log_path, cwd=work_dir
    )
    running = Running(
        name="mlserver",
        proc=proc,
        base_url=f"http://127.0.0.1:{port}",
        target=Target("127.0.0.1", port, f"/v2/models/{MLSERVER_MODEL}/infer", ()),
        classify=_classify_mlserver,
        root_name="mlserver-http",
        body=_mlserver_body,
        labels=_mlserver_labels,
        log_path=log_path,
        log_file=out,
        info={"command": "mlserver start", "version": mlserver_version(), "settings": settings},
    )
    return wait_ready(running, f"{running.base_url}/v2/models/{MLSERVER_MODEL}/ready", timeout_s)


def start_echo(log_dir: Path, timeout_s: float = 30.0) -> Running:
    """The do-nothing server that calibrates the load generator."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.echo_server", str(port)]
    log_path = log_dir / "echo.log"
    proc, out = launch(argv, clean_env(), log_path)
    running = Running(
        name="echo",
        proc=proc,
        base_url=f"http://127.0.0.1:{port}",
        target=Target("127.0.0.1", port, PREDICT_PATH, ()),
        classify=lambda cmd: "echo",
        root_name="echo",
        body=instances_body,
        labels=gateway_labels,
        log_path=log_path,
        log_file=out,
    )
    return wait_ready(running, f"{running.base_url}/", timeout_s)
