"""``rdv serve``: the all-in-one deployment on one machine.

Starts an embedded Redis unless ``RDV_REDIS_URL`` is set (and restarts it should it die),
trains the demo models on first start, creates the demo deployment if missing, then supervises
the gateway, the model workers (by default two processes hosting every role of every
deployment, following roles added or removed later; or a process per role) and the log bin.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from gateway.cli.process import (
    listening_socket,
    settings_from_args,
    share_metrics_between_processes,
    stop_event,
)
from gateway.cli.stand_in import StandIn
from gateway.cli.supervisor import (
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    STABLE_AFTER_S,
    Supervisor,
    child_env,
    detached_from_terminal,
)
from gateway.settings import http_url
from models.demo import DEMO_DEPLOYMENT, demo_deployment, demo_models_present
from models.deployment_store import DeploymentStore
from models.deployments import Deployment
from models.registry import ModelRegistry
from rendezvous.bus.connection import connect
from rendezvous.bus.redis_needs import check
from rendezvous.bus.server import EmbeddedRedis, RedisServerError, stop_left_over
from rendezvous.names import REAL

log = logging.getLogger("rdv.serve")

GATEWAY, WORKERS, LOGBIN = 0, 1, 2
"""Stop order: the gateway stops taking requests first, the log bin archives last."""

SHADOW_NICE = 5
"""Niceness added to the processes off the critical path: the log bin, and workers of roles
that never answer first (the canary, challengers without an A/B split).

Why: every request wakes the gateway, Redis, the real worker, the canary and the log bin. On
a small machine (2 cores here) under saturation they all compete for the same cores, and the
caller's latency depends only on the first three. Five steps lower gives the shadow processes
about a third of the CPU weight of the critical path (Linux CFS) when cores are contended and
costs them nothing when cores are idle; they then fall a little behind, which their consumer
group absorbs (their results still have the grace period to reach the decision record, and
they batch more). Set at spawn and kept for the process's life: a challenger given a split
later keeps it until restarted, and a canary answering as a fallback while real is down
answers from the lower priority."""


class RedisKeeper:
    """Restarts the embedded Redis when it dies, with the supervisor's backoff, on the same
    port and from its append-only file: the children keep their URL and reconnect by
    themselves, so a crash of Redis is an outage of seconds, not one that needs a person."""

    def __init__(self, server: EmbeddedRedis):
        self.server = server
        self.backoff_s = MIN_BACKOFF_S
        self.restart_at: float | None = None
        self.started = time.monotonic()
        self.restarts = 0

    def tick(self) -> None:
        now = time.monotonic()
        if self.server.running:
            if now - self.started > STABLE_AFTER_S:
                self.backoff_s = MIN_BACKOFF_S
            return
        if self.restart_at is None:
            log.error("embedded Redis exited with %s; restarting in %.1fs",
                      self.server.returncode, self.backoff_s)  # fmt: skip
            self.restart_at = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
            return
        if now < self.restart_at:
            return
        self.restart_at = None
        try:
            self.server.start(timeout_s=60)  # loading a large append-only file takes a while
        except (RedisServerError, OSError) as exc:
            log.error("embedded Redis did not come back: %s", exc)
            return
        self.started = time.monotonic()
        self.restarts += 1
        log.warning("embedded Redis restarted at %s", self.server.url)


def _worker_name(dep: str, role: str) -> str:
    return f"worker:{dep}:{role}"


def start_worker_hosts(supervisor: Supervisor, hosts: int, shadow_nice: int = SHADOW_NICE) -> None:
    """The shared layout: ``hosts`` processes for the roles that answer callers and as many,
    ``shadow_nice`` steps lower, for the others; each follows the deployments by itself
    (``models.worker_host``), so nothing here changes when roles come and go."""
    for kind, nice in (("answering", 0), ("shadow", shadow_nice)):
        for i in range(hosts):
            args = ["worker", "--roles", kind, "--shard", f"{i}/{hosts}"]
            supervisor.ensure(f"workers:{kind}:{i}", args, WORKERS, nice=nice, essential=True)


def reconcile_workers(
    supervisor: Supervisor,
    store: DeploymentStore,
    shadow_nice: int = SHADOW_NICE,
    known: Mapping[str, Deployment] | None = None,
) -> dict[str, Deployment]:
    """The per-role layout: one worker per (deployment, role); retire those whose role is
    gone. Workers of roles that never answer first start ``shadow_nice`` steps lower (see
    ``SHADOW_NICE``). Returns the states read, to pass as ``known`` next time: a state that
    cannot be read then keeps its workers as they were (one such state stopped the scan of
    every deployment after it)."""
    wanted = set()
    states = store.current(known or {})
    for dep, deployment in sorted(states.items()):
        answering = {REAL, *deployment.schedule.split_roles}
        for role in deployment.role_names:
            name = _worker_name(dep, role)
            wanted.add(name)
            args = ["worker", "--deployment", dep, "--role", role, "--consumer", f"{role}-0"]
            supervisor.ensure(name, args, WORKERS, nice=0 if role in answering else shadow_nice)
    for name in [n for n in supervisor.children if n.startswith("worker:") and n not in wanted]:
        log.info("role gone: retiring %s", name)
        supervisor.retire(name)
    return states


def _hold_data_folder(data_dir: Path) -> None:
    """One ``rdv serve`` a data folder (its archive, its log bin's name, its Redis): a lock
    held for the life of this process, and let go by the kernel however it ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(
            f"rdv serve: another rdv serve is running on the data folder {data_dir} "
            f"(it holds {data_dir / LOCK_FILE}); stop it, or give this one --data-dir"
        ) from None
    _held.append(fd)  # open until the process ends


_held: list[int] = []
LOCK_FILE = "serve.lock"


def cmd_serve(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    if settings.wait_replicas and not settings.redis_url:
        # the embedded Redis has no replica: every predict was a 503 while /readyz said 200;
        # settings that do not fit together, so status 2 as the others (it was 1)
        print(
            f"rdv serve: RDV_WAIT_REPLICAS={settings.wait_replicas} needs a Redis with replicas "
            "(RDV_REDIS_URL): the embedded one has none, so no request could be answered",
            file=sys.stderr,
        )
        sys.exit(2)
    stop = stop_event()
    try:
        listener = listening_socket(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        raise SystemExit(f"rdv serve: cannot listen on {where}: {exc}") from None
    listener.set_inheritable(True)
    _hold_data_folder(settings.data_dir)
    stand_in = StandIn(listener).start()  # 503s while no gateway runs (a first start trains)
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if not url:
        left = stop_left_over(settings.redis_dir)
        if left is not None:
            log.warning("shut down the Redis an earlier rdv serve left running at %s", left)
        embedded = EmbeddedRedis(
            settings.redis_dir,
            port=settings.embedded_redis_port or None,
            unix_socket=True,
            popen_options=detached_from_terminal(),
        )
        try:
            embedded.start()
        except RedisServerError as exc:
            stand_in.stop()
            listener.close()
            raise SystemExit(f"rdv serve: the embedded Redis did not start: {exc}") from None
        embedded.record_address()  # for the CLI commands run beside us (rdv decisions, ...)
        url = embedded.url
        log.info("embedded Redis at %s (data in %s)", url, settings.redis_dir)
    supervisor = Supervisor(
        child_env(
            {
                "RDV_REDIS_URL": url,
                "RDV_DATA_DIR": str(settings.data_dir.resolve()),
                "RDV_HOST": settings.host,
                "RDV_PORT": str(settings.port),
            }
        ),
        hung_after_s=settings.watchdog_s,
        liveness_dir=settings.data_dir / "liveness",  # ours alone: we hold the data folder
    )
    client = None
    try:
        registry = ModelRegistry(settings.models_dir)
        if not demo_models_present(registry):
            log.info("first start: training the demo models into %s", settings.models_dir)
            # In a child: scikit-learn would otherwise stay in this long-lived process's memory.
            subprocess.run([*supervisor.command, "train-demo"], env=supervisor.env, check=True)
        client = connect(url, socket_timeout_s=settings.redis_timeout_s)  # never hangs it
        check(client, allow_eviction=settings.allow_eviction)  # one line, before any child
        store = DeploymentStore(client)
        if DEMO_DEPLOYMENT not in store.list():
            store.create(demo_deployment(registry, settings.schedule()))
            log.info("created deployment %s (real v2, canary v1)", DEMO_DEPLOYMENT)
        supervisor.ensure("logbin", ["logbin", "--consumer", "logbin-0"], LOGBIN,
                          nice=settings.shadow_nice, essential=True)  # fmt: skip
        per_role = settings.worker_layout == "per-role"
        states: dict[str, Deployment] = {}
        if per_role:
            states = reconcile_workers(supervisor, store, settings.shadow_nice)
        else:
            start_worker_hosts(supervisor, settings.worker_hosts, settings.shadow_nice)
        gateways = settings.gateway_process_count
        if gateways > 1:
            share_metrics_between_processes()  # in our environment: the children inherit it
            supervisor.env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        fd = listener.fileno()
        for i in range(gateways):
            # Each its own process accepting on our socket: one that dies is restarted alone,
            # and the connections waiting meanwhile are accepted by the others or by it.
            supervisor.ensure(f"gateway-{i}" if gateways > 1 else "gateway",
                              ["gateway", "--fd", str(fd)], GATEWAY, pass_fds=(fd,),
                              essential=True)  # fmt: skip
        log.info("serving on %s", http_url(settings.host, listener.getsockname()[1]))

        next_reconcile = 0.0
        keeper = RedisKeeper(embedded) if embedded is not None else None

        def tick() -> None:
            nonlocal next_reconcile, states
            stand_in.gateways(supervisor.running("gateway"))
            if keeper is not None:
                keeper.tick()
                if keeper.restart_at is not None:
                    return  # no Redis to read deployments from until it is back
            if not per_role or time.monotonic() < next_reconcile:
                return
            next_reconcile = time.monotonic() + 2.0
            try:
                states = reconcile_workers(supervisor, store, settings.shadow_nice, states)
            except (redis.RedisError, LookupError, ValueError) as exc:
                # A deployment deleted or unreadable mid-scan must not stop the supervisor.
                log.warning("cannot read deployments: %s", exc)

        supervisor.run(stop.is_set, tick)
    finally:
        log.info("stopping: gateway, then workers, then log bin")
        stand_in.stopping()  # the connections no gateway takes now get a 503, not a reset
        supervisor.stop_all()
        stand_in.stop()  # the last ones answered, then the listening socket closed
        listener.close()
        if client is not None:
            client.close()
        if embedded is not None:
            embedded.stop()
