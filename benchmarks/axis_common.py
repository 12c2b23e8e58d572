"""What the cost axes (issue 18) share: the admin API, request bodies of N rows, one logged
load phase, waiting for workers, and a system held still while another is measured."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks import procstat
from benchmarks.harness import demo_rows, log
from benchmarks.load_phase import run_phase
from benchmarks.loadgen import Load
from benchmarks.systems import Running, start_rdv

TOKEN = "bench-axes-token"
DEPLOYMENT = "breast-cancer"
"""The demo deployment ``rdv serve`` creates: every axis loads it."""


@dataclass
class AxisOptions:
    """Every axis's knobs, from the command line of ``benchmarks.axes`` or ``benchmarks.run``."""

    duration_s: float = 10.0
    rounds: int = 3
    """Each ratio is the median of its rounds' ratios: with three, one round that a slow
    spell of the shared host took (the deployments axis' rounds read 0.835 and 0.960 in one
    run, 0.938 to 1.160 in another) no longer decides the figure, as two rounds' mean let it."""
    deployments: int = 20
    layout: str | None = None
    """``RDV_WORKER_LAYOUT`` for the deployments axis (``shared``, ``per-role``, ``both``);
    ``None``: leave it unset, the server's default."""
    settle_s: float = 10.0
    idle_s: float = 20.0
    soak_s: float = 600.0
    soak_warmup_s: float = 60.0
    soak_sample_s: float = 5.0
    soak_feedback_mb: float = 4.0
    """``RDV_FEEDBACK_MAX_MB`` of the soak's server (0: the server's default, 256): small
    enough that the outcome store, which fills by design up to it, is full within the
    warm-up, so that what grows after it is what no bound holds."""
    peak_s: float = 5.0


@dataclass
class AxisContext:
    """One run of axes: its folder, the trained demo models every ``rdv serve`` starts from,
    and the ``rdv serve`` the challengers and rows axes share (started on first use)."""

    work: Path
    models: Path
    options: AxisOptions
    _shared: Running | None = field(default=None, repr=False)

    def start(self, name: str, settings: dict[str, str] | None = None) -> Running:
        """A fresh ``rdv serve`` on its own data folder, with the trained models."""
        data = self.work / f"{name}-data"
        if not (data / "models").exists():
            shutil.copytree(self.models, data / "models")
        return start_rdv(
            data, self.work, settings={"RDV_ADMIN_TOKEN": TOKEN, **(settings or {})}, name=name
        )

    def shared(self) -> Running:
        if self._shared is None:
            self._shared = self.start("gateway")
        return self._shared

    def close(self) -> None:
        if self._shared is not None:
            self._shared.stop()
            self._shared = None


def admin(running: Running, method: str, path: str, doc: dict[str, Any] | None) -> Any:
    req = urllib.request.Request(
        f"{running.base_url}/admin{path}",
        data=None if doc is None else json.dumps(doc).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def with_bodies(running: Running, rows_per_request: int) -> Running:
    """The system with request bodies of ``rows_per_request`` demo rows each."""
    rows = demo_rows()
    bodies = tuple(
        json.dumps(
            {"instances": [rows[(i + k) % len(rows)] for k in range(rows_per_request)]}
        ).encode()
        for i in range(0, len(rows), max(1, len(rows) // 16))
    )
    return dataclasses.replace(running, target=dataclasses.replace(running.target, bodies=bodies))


def live_roles(running: Running, deployment: str) -> set[str]:
    """Roles with a live worker; none while the gateway cannot say (a 503 just after it was
    held still: its Redis commands in flight then timed out)."""
    try:
        doc = admin(running, "GET", f"/deployments/{deployment}", None)
    except OSError:  # urllib's HTTPError and URLError too
        return set()
    return {role for role, n in (doc.get("live_workers") or {}).items() if n > 0}


def workers_live(
    running: Running, roles: set[str], deployment: str = DEPLOYMENT, timeout_s: float = 60.0
) -> None:
    """Wait until every role has a live worker (the supervisor starts one within seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if roles <= live_roles(running, deployment):
            return
        time.sleep(0.5)
    raise RuntimeError(f"workers of {deployment} {sorted(roles)} not up in {timeout_s:g} s")


def rss_mb(running: Running) -> float:
    """RSS summed over every process of the system, now (a fork's shared pages once)."""
    tree = running.tree
    members = tree.members()
    total = sum(procstat.resident_once_bytes(pid, tree.parent_of.get(pid)) for pid in members)
    return round(total / procstat.MB, 1)


def redis_used_memory_mb(running: Running) -> float | None:
    """Redis's own count of the memory it holds (``INFO memory``), MB."""
    if not running.redis_nodes:
        return None
    node = running.redis_nodes[0]
    with redis.Redis(host=node.host, port=node.port, socket_timeout=5) as client:
        info = client.info("memory")
    return round(int(info["used_memory"]) / procstat.MB, 2)


def redis_persistence(running: Running) -> dict[str, int] | None:
    """Redis's fork and AOF counters since it started (``INFO``): ``total_forks`` (each AOF
    rewrite is one: a fork, then a child writing the whole dataset, about a core for a moment
    on this machine) and ``aof_delayed_fsync`` (writes that waited for a slow background
    fsync, blocking Redis's one thread). A window's latency can then be read against them."""
    if not running.redis_nodes:
        return None
    node = running.redis_nodes[0]
    with redis.Redis(host=node.host, port=node.port, socket_timeout=5) as client:
        info = client.info()  # the default sections, stats and persistence among them
    return {"forks": int(info.get("total_forks", 0)),
            "aof_delayed_fsync": int(info.get("aof_delayed_fsync", 0))}  # fmt: skip


def outcome_store_mb(running: Running, deployment: str = DEPLOYMENT) -> float | None:
    """What the deployment's outcome store (the answers kept for labels, bounded by
    ``RDV_FEEDBACK_MAX_MB``) holds in Redis, MB: ``MEMORY USAGE`` of each of its buckets,
    Redis's own estimate from a few sampled fields (an exact count would walk a hash of a
    hundred thousand fields per sample, on the Redis under test)."""
    from rendezvous import names
    from rendezvous.outcomes import held_buckets

    if not running.redis_nodes:
        return None
    node = running.redis_nodes[0]
    with redis.Redis(host=node.host, port=node.port, socket_timeout=5) as client:
        state = names.outcomes_state_key(deployment)
        keys = [names.outcomes_key(deployment, b) for b in held_buckets(client.hkeys(state))]
        pipe = client.pipeline(transaction=False)
        for key in [state, *keys]:
            pipe.memory_usage(key)
        total = sum(int(v or 0) for v in pipe.execute())
    return round(total / procstat.MB, 2)


def phase(running: Running, load: Load) -> dict[str, Any]:
    """One load, logged, with the system's RSS right after it (for the memory plots)."""
    figures = run_phase(running, load, 2 if load.concurrency > 8 else 1)
    figures["rss_mb_after"] = rss_mb(running)
    failed = {k: v for k, v in figures["statuses"].items() if k not in ("200", "429")}
    log(f"{running.name} {load.label}: {figures['throughput_rps']:,.0f} req/s, "
        f"p50 {figures['latency_ms'].get('p50')} ms, errors {figures['errors']}"
        + (f" {failed}" if failed else ""))  # fmt: skip
    return figures


@contextmanager
def held_still(running: Running) -> Iterator[None]:
    """Every process of the system stopped (SIGSTOP) meanwhile: it takes no CPU, so another
    system is measured alone, and it keeps its state (a restart would cost minutes and change
    what is measured). The supervisor stops first and resumes last, so it sees no child
    pause; Redis resumes before its clients."""
    members = running.tree.members()
    root = running.proc.pid
    order = [root, *(p for p, name in members.items() if p != root and name != "redis")]
    order += [p for p, name in members.items() if name == "redis"]
    for pid in order:
        _signal(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(order):
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)
