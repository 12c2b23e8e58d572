"""Start ``rdv`` subcommands as real processes for end-to-end tests, and stop them cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from models.deployments import DeploymentStore, demo_deployment
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.redis_server import free_port
from rendezvous.schedule import Schedule

PREDICT = f"/v1/deployments/{DEMO_DEPLOYMENT}/predict"


class RdvProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait: a clean shutdown exits 0 within the timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                raise AssertionError(f"{self.args} ignored SIGTERM for {timeout_s}s") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def rdv_env(redis_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RDV_REDIS_URL": redis_url,
            "RDV_DATA_DIR": str(data_dir),
            "RDV_PORT": str(port),
            "RDV_HOST": "127.0.0.1",
            "RDV_WORKER_BLOCK_MS": "200",
            **extra,
        }
    )
    return env


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


class System:
    """A gateway, workers and a log bin as ``rdv`` processes on one Redis and data folder."""

    def __init__(self, redis_url: str, data_dir: Path, logs: Path, **env: str):
        self.redis_url, self.data_dir, self.logs = redis_url, data_dir, logs
        self.port = free_port()
        self.env = rdv_env(redis_url, data_dir, self.port, **env)
        self.procs: dict[str, RdvProcess] = {}
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.r = redis.Redis.from_url(redis_url)

    def start(self, name: str, *args: str) -> RdvProcess:
        proc = RdvProcess(list(args), self.env, self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_worker(self, role: str) -> None:
        self.start(role, "worker", "--deployment", DEMO_DEPLOYMENT, "--role", role,
                   "--consumer", f"{role}-e2e")  # fmt: skip
        wait_until(lambda: self.live(role), 30, f"{role} worker heartbeat")

    def live(self, role: str) -> bool:
        members = self.r.zrangebyscore(names.workers_key(DEMO_DEPLOYMENT), time.time() - 1, "+inf")
        return any(m.decode().startswith(f"{role}|") for m in members)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        code = proc.stop()
        # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done.
        clean = code == 0 or (code == -15 and "Application shutdown complete" in proc.log_text())
        assert clean, f"{name} exited with {code}:\n{proc.log_text()[-2000:]}"
        if name in ("real", "canary"):
            self.r.zrem(names.workers_key(DEMO_DEPLOYMENT), f"{name}|{name}-e2e")

    def predict(self, body: dict, **headers: str) -> httpx.Response:
        return self.http.post(PREDICT, json=body, headers=headers)


@contextmanager
def launch_system(
    redis_url: str,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    schedule: Schedule,
    **env: str,
) -> Iterator[System]:
    """Flush Redis, create the demo deployment, start the gateway and the log bin; on exit
    stop every process still running and check each stopped cleanly."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    registry = ModelRegistry(demo_data_dir / "models")
    DeploymentStore(client).create(demo_deployment(registry, schedule))
    data_dir = tmp_path_factory.mktemp("system-data")
    (data_dir / "models").symlink_to(demo_data_dir / "models")
    sys = System(redis_url, data_dir, tmp_path_factory.mktemp("system-logs"), **env)
    sys.start("gateway", "gateway")
    sys.start("logbin", "logbin")
    wait_until(lambda: sys.http.get("/healthz").status_code == 200, 30, "gateway /healthz")
    try:
        yield sys
    finally:
        sys.http.close()
        client.close()
        failures = []
        for name in list(sys.procs):
            try:
                sys.stop(name)
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, failures
