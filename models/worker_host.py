"""Many models in one worker process: a thread per (deployment, role), following the
deployments as they change.

Why: a process per role costs about 60 MB before its first request (Python, numpy and
onnxruntime loaded again each time), so twenty deployments of a real and a canary meant forty
processes and 2.4 GB. A demo-sized model in onnxruntime is a few hundred kB, and an idle model
costs a thread blocked in its ``XREADGROUP`` (holding no GIL) and a heartbeat a second, so one
process hosts them all. Each hosted model is the same ``ModelWorker`` a single-role process runs,
with its own Redis client, consumer name and counters, so everything that reads the workers
(readiness, ``/metrics``, the admin API) sees no difference. Blocking reads stay per
deployment, which a cluster requires (one read cannot span slots).

``rdv serve`` runs two hosts by default (``RDV_WORKER_LAYOUT=shared``): one for the roles that
answer callers (real, challengers with an A/B split) and one, at a lower CPU priority, for the
roles that only shadow; on two cores the critical path then keeps its own process, as with a
process per role. A model that takes its thread down (an unexpected error) is restarted alone,
with backoff; a process per role (``RDV_WORKER_LAYOUT=per-role``) remains for isolation.

The shadow roles of one deployment share a thread: they read the same input, so one worker
reads every shadow role's group in one round trip, decodes each envelope once and answers each
gateway with one entry for all of them (``ModelWorker.serve_roles``), where a thread each read,
decoded and answered four times over with three challengers (about 27 us of CPU a role and
request). Each role keeps its own group, consumer, model and counters; a shadow model that
cannot load is retried by its worker, the others scoring meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from models.deployment_store import DeploymentStore
from models.deployments import Deployment
from models.hosting import HOSTED_BLOCK_MS
from models.registry import ModelNotFound
from models.worker import ModelWorker
from rendezvous.bus.connection import Client
from rendezvous.bus.consumer import stop_thread
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.liveness import Liveness
from rendezvous.names import REAL
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

RoleKind = Literal["all", "answering", "shadow"]

RELEASE_GRACE_S = 1.0
"""Beyond ``HOSTED_BLOCK_MS``, how long a role's own thread waits for the shared worker that
served it to let it go (``WorkerHost._await_released``)."""

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 30.0
"""A hosted model that ran this long since its last restart has its backoff reset."""


def answering_roles(dep: Deployment) -> set[str]:
    """Roles whose answer a caller may get first: real and challengers with an A/B split."""
    return {REAL, *dep.schedule.split_roles}


@dataclass(frozen=True)
class Selection:
    """Which (deployment, role) pairs a host serves."""

    roles: RoleKind = "all"
    deployment: str | None = None
    """Only this deployment (None: every deployment)."""
    shard: int = 0
    shards: int = 1
    """Several hosts of one kind split the pairs between them by a stable hash."""

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is not in 0..{self.shards - 1}")

    def picks(self, dep: Deployment, role: str) -> bool:
        if self.deployment is not None and dep.name != self.deployment:
            return False
        answering = role in answering_roles(dep)
        if (self.roles == "answering" and not answering) or (self.roles == "shadow" and answering):
            return False
        return zlib.crc32(f"{dep.name}/{role}".encode()) % self.shards == self.shard


@dataclass
class _Hosted:
    worker: ModelWorker
    stop: threading.Event
    started: float
    shadows: bool = False
    """It serves its deployment's shadow roles (``ModelWorker.serve_roles``), its first role
    among them; else one role alone."""
    failed: bool = False
    """Its thread ended with an error (else it ended because it was asked to, or its role was
    removed), to be restarted if still wanted."""
    backoff_s: float = RESTART_MIN_S
    restart_at: float | None = None
    thread: threading.Thread = field(init=False)


_SCAN_FAILURES: tuple[type[Exception], ...] = (*REDIS_FAILURES, LookupError, ValueError)

MakeWorker = Callable[[str, str], ModelWorker]
"""(deployment, role) -> a worker with its own client, not yet running."""


def hosted_consumer(role: str, kind: RoleKind = "all", host: str = "0") -> str:
    """The consumer name of a hosted role. A host of every kind, or of the answering roles,
    names it as a process of its own does in ``rdv serve`` (``R-0``), so that a change of
    layout re-reads the pending entries the other left. A host of shadow roles names it apart
    (``R-s0``): a role that starts or stops answering (an A/B split) moves between an
    answering and a shadow host, each following the deployments on its own clock, and under
    one name the host starting it would re-read, as its own pending entries, the batch the
    other still has in hand, and score it twice. Under two names each entry goes to one of
    them; what the other leaves pending it acks, or a live member claims once idle
    (``RDV_CLAIM_IDLE_MS``) if it died. (Within one host, ``WorkerHost._await_released``.)
    Hosts that serve the same roles need names of their own (``host``, ``rdv worker --name``;
    ``models.name_owner`` refuses a second under one name)."""
    return f"{role}-s{host}" if kind == "shadow" else f"{role}-{host}"


@dataclass
class WorkerHost:
    store: DeploymentStore
    make_worker: MakeWorker
    selection: Selection = field(default_factory=Selection)
    refresh_s: float = 2.0
    """How often the deployments are read again for roles added or removed."""
    consumer_of: Callable[[str], str] | None = None
    """A role's consumer name, for the shadow roles a worker serves besides its first
    (default: ``hosted_consumer`` for the selection's kind)."""
    hosted: dict[tuple[str, str], _Hosted] = field(default_factory=dict)
    """(deployment, first role) -> its worker."""
    restarts: int = 0
    _known: dict[str, Deployment] = field(default_factory=dict)

    def run(self, stop: threading.Event) -> None:
        """Follow the deployments until ``stop``; then stop every hosted model (each finishes
        its batch in hand) and wait for them."""
        liveness = Liveness.from_env()
        retry_log = RetryLog(log, "worker host: reading the deployments")
        try:
            while not stop.is_set():
                try:
                    self.reconcile()
                    retry_log.succeeded()
                except _SCAN_FAILURES as exc:
                    # Redis down, or a deployment deleted or unreadable mid-scan: the hosted
                    # models ride it out by themselves; try again at the next refresh.
                    retry_log.failed(exc)
                liveness.beat(self.progressed_at())
                stop.wait(self.refresh_s)
        finally:
            self.stop_all()

    def progressed_at(self) -> float:
        """When the slowest running hosted model last began a step (epoch s; now if none
        runs): one stuck in a call that never returns holds it back, and the host is
        restarted (``rendezvous.liveness``), since a thread cannot be stopped from outside."""
        steps = [h.worker.stepped_at for h in self.hosted.values() if h.thread.is_alive()]
        return min(steps, default=time.time())

    def wanted(self) -> set[tuple[str, str]]:
        """Every (deployment, role) this host should serve now (a state is read again only
        when its revision moved)."""
        self._known = self.store.current(self._known)
        return {(dep.name, role) for dep in self._known.values() for role in dep.role_names
                if self.selection.picks(dep, role)}  # fmt: skip

    def serving(self) -> set[tuple[str, str]]:
        """Every (deployment, role) a worker of this host serves now (or is starting)."""
        return {(dep, role) for (dep, first), hosted in self.hosted.items()
                for role in (first, *hosted.worker.serving_beside())}  # fmt: skip

    def reconcile(self) -> None:
        """Start what is wanted and not hosted, retire what is no longer wanted, and restart
        (after its backoff) a model whose thread died."""
        wanted = self.wanted()
        alone: set[tuple[str, str]] = set()
        shadows: dict[str, list[str]] = {}
        for dep, role in wanted:
            if role in answering_roles(self._known[dep]):
                alone.add((dep, role))
            else:
                shadows.setdefault(dep, []).append(role)
        for key, hosted in list(self.hosted.items()):
            dep, role = key
            still_wanted = role in shadows.get(dep, ()) if hosted.shadows else key in alone
            if still_wanted:
                continue
            log.info("worker host: %s/%s is no longer served here; retiring it", *key)
            self._retire(self.hosted.pop(key))
        now = time.monotonic()
        for dep, roles in sorted(shadows.items()):
            roles.sort()
            first = next((r for r in roles if (dep, r) in self.hosted), roles[0])
            hosted = self._keep((dep, first), now, shadows=True)
            hosted.worker.serve_roles({r: self._consumer(r) for r in roles})
        self._await_released(alone - set(self.hosted))
        for key in sorted(alone):
            self._keep(key, now, shadows=False)

    def _consumer(self, role: str) -> str:
        if self.consumer_of is not None:
            return self.consumer_of(role)
        return hosted_consumer(role, self.selection.roles)

    def _await_released(self, starting: set[tuple[str, str]]) -> None:
        """Wait until no shared worker serves a role about to get a thread of its own.

        A shadow role that starts answering (an A/B split) leaves its deployment's shared
        worker at that worker's next step, which first sends the acks of the batch in hand.
        Its own thread reads the role's group under the same consumer name, starting with that
        consumer's pending entries: started before, it would score that batch a second time.
        The shared worker goes on scoring the role until then, so the wait leaves no gap. It
        is bounded (an idle worker steps within ``HOSTED_BLOCK_MS``); past it, the thread
        starts anyway, and a batch scored twice is the price (the gateway keeps the first)."""
        deadline = time.monotonic() + HOSTED_BLOCK_MS / 1000 + RELEASE_GRACE_S
        while True:
            held = starting & self._served_beside()
            if not held:
                return
            if time.monotonic() >= deadline:
                log.warning("worker host: %s still served by a shared worker; starting anyway",
                            sorted(held))  # fmt: skip
                return
            time.sleep(0.005)

    def _served_beside(self) -> set[tuple[str, str]]:
        """(deployment, role) of every role a running shared worker serves beside its first."""
        return {(dep, role) for (dep, _), hosted in self.hosted.items()
                if hosted.shadows and hosted.thread.is_alive()
                for role in hosted.worker.serving_beside()}  # fmt: skip

    def _keep(self, key: tuple[str, str], now: float, *, shadows: bool) -> _Hosted:
        hosted = self.hosted.get(key)
        if hosted is None:
            self.hosted[key] = self._start(*key, shadows=shadows)
        elif not hosted.thread.is_alive():
            self._restart_if_due(key, hosted, now)
        elif now - hosted.started > STABLE_AFTER_S:
            hosted.backoff_s = RESTART_MIN_S
        return self.hosted[key]

    def _restart_if_due(self, key: tuple[str, str], hosted: _Hosted, now: float) -> None:
        if hosted.restart_at is None:
            hosted.restart_at = now + (hosted.backoff_s if hosted.failed else 0.0)
            if hosted.failed:
                log.error("worker host: %s/%s failed; restarting it in %.1fs", *key,
                          hosted.backoff_s)  # fmt: skip
        if now < hosted.restart_at:
            return
        backoff = min(hosted.backoff_s * 2, RESTART_MAX_S) if hosted.failed else hosted.backoff_s
        self.hosted[key] = self._start(*key, shadows=hosted.shadows)
        self.hosted[key].backoff_s = backoff
        self.restarts += 1

    def _start(self, deployment: str, role: str, *, shadows: bool) -> _Hosted:
        hosted = _Hosted(self.make_worker(deployment, role), threading.Event(), time.monotonic(),
                         shadows)  # fmt: skip
        name = f"worker:{deployment}:{role}"
        hosted.thread = threading.Thread(target=self._serve, args=(hosted,), name=name, daemon=True)
        hosted.thread.start()
        log.info("worker host: serving %s/%s%s", deployment, role,
                 " and the other shadow roles" if shadows else "")  # fmt: skip
        return hosted

    @staticmethod
    def _serve(hosted: _Hosted) -> None:
        """The thread of one hosted model: the worker's own loop (it rides out Redis outages,
        and ends by itself if its role is removed)."""
        try:
            hosted.worker.run(hosted.stop)
        except ModelNotFound as exc:  # the data folder's business, not a bug: no traceback
            hosted.failed = True
            log.error("worker host: %s/%s cannot load its model: %s", hosted.worker.deployment,
                      hosted.worker.role, exc)  # fmt: skip
        except Exception:
            hosted.failed = True
            log.exception("worker host: %s/%s stopped on an error", hosted.worker.deployment,
                          hosted.worker.role)  # fmt: skip
        finally:
            hosted.worker.client.close()  # its own (``client_per_worker``): a restart makes anew

    @staticmethod
    def _retire(hosted: _Hosted, grace_s: float = 10.0) -> None:
        hosted.stop.set()
        stop_thread(hosted.worker, hosted.thread, time.monotonic() + grace_s)

    def stop_all(self, grace_s: float = 15.0) -> None:
        for hosted in self.hosted.values():
            hosted.stop.set()
        for hosted in self.hosted.values():  # all at once; then each until it has ended
            hosted.worker.interrupt()
        deadline = time.monotonic() + grace_s
        for hosted in self.hosted.values():
            stop_thread(hosted.worker, hosted.thread, deadline)
        self.hosted.clear()


def client_per_worker(connect: Callable[[], Client], build: Callable[[Client, str, str],
                      ModelWorker]) -> MakeWorker:  # fmt: skip
    """A ``MakeWorker`` giving each hosted model its own client: a thread never shares a
    connection pool or a cluster slot table with another, and a busy model's round trips
    never wait behind an idle one's blocking read."""
    return lambda deployment, role: build(connect(), deployment, role)
