"""The systems under test, each started as real processes on a free port and stopped with
SIGTERM: what every system shares (``Running``, its launch and its wait to be ready), and
``rdv serve`` (the full rendezvous path) on its embedded Redis or on a local Redis Cluster
started beside it. The baselines it is compared against are in ``benchmarks.baselines``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from benchmarks.loadgen import Target
from benchmarks.procstat import ProcessTree
from benchmarks.redisstat import Node
from gateway.settings import Settings
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import recorded_url

REPO = Path(__file__).resolve().parent.parent
PREDICT_PATH = "/v1/deployments/breast-cancer/predict"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def post_json(url: str, doc: Any, timeout_s: float = 5.0) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


@dataclass
class Running:
    """One system under test, up and answering."""

    name: str
    proc: subprocess.Popen[bytes]
    target: Target
    base_url: str
    classify: Callable[[str], str]
    body: Callable[[list[float]], dict[str, Any]]
    """The request body this system takes for one row."""
    labels: Callable[[Any], list[int]]
    """The predicted labels in this system's response."""
    log_path: Path
    root_name: str = "supervisor"
    """What the launched process itself is (the others are named by ``classify``)."""
    info: dict[str, Any] = field(default_factory=dict)
    redis_nodes: list[Node] = field(default_factory=list)
    """The Redis nodes whose commands and bytes each load counts (``redisstat``)."""
    extra_roots: dict[int, str] = field(default_factory=dict)
    """Processes of the system outside ``proc``'s tree: pid -> component."""
    after_stop: Callable[[], None] | None = None
    """Run by ``stop`` once ``proc`` is gone, whatever happened (the cluster's own stop)."""
    log_file: IO[bytes] | None = None
    """The launched process's output, closed by ``stop``."""

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(self.proc.pid, self.classify, self.root_name, self.extra_roots)

    def predict_labels(self, row: list[float]) -> list[int]:
        return self.labels(post_json(self.base_url + self.target.path, self.body(row)))

    def stop(self, timeout_s: float = 30.0) -> int | None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            if self.log_file is not None:
                self.log_file.close()
        finally:
            after, self.after_stop = self.after_stop, None
            if after is not None:
                after()
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def launch(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log = open(log_path, "ab")  # noqa: SIM115 - closed by Running.stop
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, log


def wait_ready(running: Running, url: str, timeout_s: float) -> Running:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            raise RuntimeError(
                f"{running.name} exited with {running.proc.returncode}:\n{running.log_tail()}"
            )
        if http_status(url) == 200:
            return running
        time.sleep(0.2)
    running.stop()
    raise RuntimeError(f"{running.name} not ready within {timeout_s}s:\n{running.log_tail()}")


def instances_body(row: list[float]) -> dict[str, Any]:
    return {"instances": [row]}


def gateway_labels(doc: Any) -> list[int]:
    return [int(p["label"]) for p in doc["predictions"]]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    env.update(extra)
    return env


def _classify_rdv(cmd: str) -> str:
    if "redis-server" in cmd:
        return "redis"
    if "--roles " in cmd:  # one worker process hosting many (deployment, role) models
        return "worker:" + cmd.split("--roles ", 1)[1].split()[0]
    for role in ("real", "canary"):
        if f"--role {role}" in cmd:
            return f"worker:{role}"
    if "--role " in cmd:
        return "worker:" + cmd.split("--role ", 1)[1].split()[0]
    for name in ("gateway", "logbin"):
        if f"gateway.cli.main {name}" in cmd:
            return name
    return "other"


def start_rdv(
    data_dir: Path,
    log_dir: Path,
    gateway_processes: int | None = None,
    timeout_s: float = 180.0,
    settings: dict[str, str] | None = None,
    name: str = "gateway",
) -> Running:
    """``rdv serve`` on a fresh data folder: embedded Redis (unless ``settings`` has an
    ``RDV_REDIS_URL``), demo training, every process. ``settings``: further ``RDV_``
    variables for the system under test (A/B runs)."""
    port = free_port()
    extra = {"RDV_LOG_LEVEL": "WARNING", **(settings or {})}
    if gateway_processes:
        extra["RDV_GATEWAY_PROCESSES"] = str(gateway_processes)
    argv = [
        sys.executable,
        "-m",
        "gateway.cli.main",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    log_path = log_dir / f"rdv-serve-{name}.log"
    proc, log = launch(argv, clean_env(**extra), log_path)
    running = Running(
        name=name,
        proc=proc,
        base_url=f"http://127.0.0.1:{port}",
        target=Target("127.0.0.1", port, PREDICT_PATH, ()),
        classify=_classify_rdv,
        body=instances_body,
        labels=gateway_labels,
        log_path=log_path,
        log_file=log,
        info={
            "command": "rdv serve",
            "env": extra,
            "gateway_processes": Settings(
                gateway_processes=gateway_processes or 0
            ).gateway_process_count,
        },
    )
    try:  # whatever interrupts the start (an error, SIGTERM as SystemExit) stops the server
        wait_ready(running, f"{running.base_url}/readyz", timeout_s)
        if "RDV_REDIS_URL" not in extra:  # the embedded Redis: serve records where it listens
            url = recorded_url(data_dir / "redis")
            if url:  # a Unix socket: the server's TCP port, for the stats sampler
                with redis.Redis.from_url(url) as client:
                    port = int(client.config_get("port")["port"])  # type: ignore[union-attr,index]
                running.redis_nodes = [Node("127.0.0.1", port, "master")]
    except BaseException:
        running.stop()
        raise
    return running


def start_rdv_cluster(
    data_dir: Path,
    cluster_dir: Path,
    log_dir: Path,
    gateway_processes: int | None = None,
    settings: dict[str, str] | None = None,
    partitions: int = 1,
    replicas: int = 1,
    name: str = "gateway-cluster",
) -> Running:
    """A local Redis Cluster (3 masters, ``replicas`` each, in ``cluster_dir``), then ``rdv
    serve`` on it (``RDV_REDIS_URL``: one node; serve starts no Redis and creates the demo
    deployment there). The cluster's nodes count as the system's processes (``redis`` for a
    master, ``redis-replica``) and are stopped with it, whatever happens. ``partitions`` > 1:
    the demo deployment is changed to that many input partitions through the admin API
    before any load."""
    cluster = LocalCluster(cluster_dir, masters=3, replicas_per_master=replicas).start()
    try:
        masters = set(cluster.masters())
        extra = {**(settings or {}), "RDV_REDIS_URL": cluster.url}
        if partitions > 1:
            extra.setdefault("RDV_ADMIN_TOKEN", "bench-" + os.urandom(8).hex())
        running = start_rdv(data_dir, log_dir, gateway_processes, settings=extra, name=name)
    except BaseException:
        cluster.stop()
        raise
    running.after_stop = cluster.stop
    try:
        for port in cluster.nodes:
            pid = cluster.pid(port)
            if pid is not None:
                running.extra_roots[pid] = "redis" if port in masters else "redis-replica"
        running.redis_nodes = [
            Node("127.0.0.1", port, "master" if port in masters else "replica")
            for port in cluster.nodes
        ]
        running.info["cluster"] = {
            "masters": sorted(masters),
            "replicas": sorted(set(cluster.nodes) - masters),
            "node_timeout_ms": cluster.node_timeout_ms,
        }
        if partitions > 1:
            _set_partitions(running, extra["RDV_ADMIN_TOKEN"], partitions)
        running.info["partitions"] = partitions
    except BaseException:
        running.stop()
        raise
    return running


def _set_partitions(running: Running, token: str, partitions: int) -> None:
    req = urllib.request.Request(
        f"{running.base_url}/admin/deployments/breast-cancer",
        data=json.dumps({"partitions": partitions, "reason": "benchmark"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="PATCH",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
    time.sleep(2.5)  # every gateway process's deployment cache and the workers follow
