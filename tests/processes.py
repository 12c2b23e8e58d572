"""Start ``rdv`` subcommands as real processes for end-to-end tests, and stop them cleanly."""

from __future__ import annotations

import os
import shutil
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

from gateway.cli.supervisor import detached_from_terminal
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.bus.connection import Client, connect
from rendezvous.bus.server import free_port
from rendezvous.schedule import Schedule

PREDICT = f"/v1/deployments/{DEMO_DEPLOYMENT}/predict"


class RdvProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **detached_from_terminal(),  # and dies with the test run, should it be killed
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


def alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def open_files_under(folder: Path) -> int:
    """This process's open files in ``folder`` (read from ``/proc``: a descriptor closed
    meanwhile is skipped)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/")
        except OSError:
            continue
    return found


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

    def __init__(
        self, redis_url: str, data_dir: Path, logs: Path, port: int | None = None, **env: str
    ):
        self.redis_url, self.data_dir, self.logs = redis_url, data_dir, logs
        self.port = port or free_port()
        self.env = rdv_env(redis_url, data_dir, self.port, **env)
        self.procs: dict[str, RdvProcess] = {}
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.r = connect(redis_url)

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


def flush(client: Client) -> None:
    """Empty a single Redis's database, or every master of a cluster."""
    if isinstance(client, redis.RedisCluster):
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        client.flushdb()


@contextmanager
def launch_system(
    redis_url: str,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    schedule: Schedule,
    *,
    own_models: bool = False,
    port: int | None = None,
    **env: str,
) -> Iterator[System]:
    """Flush Redis, create the demo deployment, start the gateway and the log bin; on exit
    stop every process still running and check each stopped cleanly. ``own_models``: a copy
    of the session's demo models, for a test that uploads or deletes (else a link to them);
    ``port``: the gateway's (default: any free one)."""
    client = connect(redis_url)
    flush(client)
    registry = ModelRegistry(demo_data_dir / "models")
    DeploymentStore(client).create(demo_deployment(registry, schedule))
    data_dir = tmp_path_factory.mktemp("system-data")
    if own_models:
        shutil.copytree(demo_data_dir / "models", data_dir / "models")
    else:
        (data_dir / "models").symlink_to(demo_data_dir / "models")
    sys = System(redis_url, data_dir, tmp_path_factory.mktemp("system-logs"), port, **env)
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


class Load:
    """A steady, bounded load from a few client threads: each sends one request at a time
    until ``stop()``, the count bound or the time bound, and records every outcome."""

    def __init__(
        self,
        base_url: str,
        bodies: list[dict],
        threads: int = 3,
        max_requests: int = 5000,
        max_s: float = 30.0,
        prefix: str = "load",
    ):
        import threading

        self.base_url, self.bodies, self.prefix = base_url, bodies, prefix
        self.max_requests, self.max_s = max_requests, max_s
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.max_s + 15)

    def _run(self, thread: int) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                rid = f"{self.prefix}-{thread}-{n}"
                body = self.bodies[n % len(self.bodies)]
                n += 1
                t0 = time.monotonic()
                rec: dict = {"id": rid, "t": t0}
                try:
                    resp = http.post(PREDICT, json=body, headers={"X-Request-Id": rid})
                    rec["status"] = resp.status_code
                    if resp.status_code == 200:
                        rec["model"] = resp.json()["model"]
                    else:
                        rec["detail"] = resp.text[:200]
                        rec["retry_after"] = resp.headers.get("retry-after")
                except httpx.HTTPError as exc:
                    rec["status"] = None
                    rec["error"] = type(exc).__name__
                    time.sleep(0.02)
                rec["ms"] = (time.monotonic() - t0) * 1000
                with self._lock:
                    self.results.append(rec)

    def count(self, status: int | None) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    def ok_ids(self) -> set[str]:
        return {r["id"] for r in self.results if r["status"] == 200}

    def figures(self) -> dict[str, int]:
        statuses: dict[str, int] = {}
        for r in self.results:
            key = str(r["status"]) if r["status"] is not None else f"no-answer:{r['error']}"
            statuses[key] = statuses.get(key, 0) + 1
        return {"sent": len(self.results), "answered_2xx": self.count(200), **statuses}


def bodies(n: int = 20) -> list[dict]:
    """``n`` single-row predict bodies from the demo data's test rows."""
    from models.train import demo_data

    data = demo_data()
    return [{"instances": [data.x_test[i].tolist()]} for i in range(n)]


def report(name: str, figures: dict) -> None:
    """Print a fault test's figures (shown with ``pytest -s``)."""
    import json

    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))


class WebhookReceiver:
    """A real HTTP server on loopback that keeps every JSON body POSTed to it; ``fail_first``
    answers that many posts 500 first (to see retries)."""

    def __init__(self, fail_first: int = 0):
        import http.server
        import json
        import threading

        received: list[dict] = []
        failures = [fail_first]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if failures[0] > 0:
                    failures[0] -= 1
                    self.send_response(500)
                else:
                    received.append(json.loads(body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def stream_head(r: redis.Redis, stream: str) -> bytes | None:
    """The id of the last entry ever appended to ``stream`` (None: no such stream). Unlike its
    length, the log bin's trimming behind its readers does not move it: what tells whether a
    request was published."""
    if not r.exists(stream):
        return None
    return r.xinfo_stream(stream)["last-generated-id"]  # type: ignore[no-any-return,index]
