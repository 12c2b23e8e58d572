"""Replays under ``/admin/deployments/{d}/replays``: start, watch, stop and resume offline
scorings of a model version on the archive (``models.replay``).

A replay runs in a process of its own, spawned by the gateway process that accepted it (at
most ``RDV_REPLAY_CONCURRENCY`` at once), ``RDV_SHADOW_NICE`` steps below live traffic: reading
and decoding the archive would otherwise hold the gateway's GIL and delay its event loop.
Reports live in Redis, so any gateway answers for any replay, a stop asked of one gateway
reaches the runner of another, and a replay whose gateway went away resumes anywhere.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gateway.admin.bodies import MAX_VERSION, Conflict, Invalid, NotFound
from gateway.settings import Settings
from models.archive_slice import MAX_LAST, SliceError, parse_time, positions_from
from models.deployment_store import DeploymentStore
from models.deployments import DeploymentNotFound
from models.meta import unfit_for
from models.registry import ModelNotFound, ModelRegistry
from models.replay import run_process
from models.replay_report import new_report
from models.replay_store import (
    DONE,
    HANDING_OVER,
    LEASE_MS,
    LIST_LIMIT,
    RUNNING,
    ReplayStore,
    new_replay_id,
)
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.bus.failures import REDIS_FAILURES

log = logging.getLogger(__name__)

_JOIN_S = 10.0
_CANCEL_WAIT_S = 10.0


class ReplayIn(BaseModel):
    """A replay's request: a version, and which archived records (a time range, the last N,
    or the positions of an earlier report; nothing: everything archived until now)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    version: int = Field(ge=1, le=MAX_VERSION)
    model: str | None = Field(default=None, description="default: the real model's name")
    from_: str | float | None = Field(default=None, alias="from",
                                      description="ISO-8601 or epoch ms, inclusive")  # fmt: skip
    to: str | float | None = Field(default=None, description="ISO-8601 or epoch ms, inclusive")
    last: int | None = Field(default=None, ge=1, le=MAX_LAST,
                             description="the last N records archived")  # fmt: skip
    positions: dict[str, Any] | None = Field(
        default=None, description='{"<stream>": {"first": id, "last": id}}, as reports name them'
    )


class ReplayManager:
    """Starts replay processes and answers for stored reports (synchronous: call it from a
    worker thread)."""

    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        settings: Settings,
    ):
        self.client = client
        self.registry = registry
        self.settings = settings
        self.store = ReplayStore(client)
        self.batch_rows = settings.replay_batch_rows
        self.concurrency = settings.replay_concurrency
        self.owner = HANDING_OVER
        """The lease's holder until the replay's process renews it with its own name."""
        self._processes: dict[tuple[str, str], BaseProcess] = {}
        """(deployment, replay id) -> the process running it."""
        self._lock = threading.Lock()

    def start(self, deployment: str, body: ReplayIn) -> dict[str, Any]:
        try:
            dep = DeploymentStore(self.client).get(names.check_name(deployment, "deployment"))
        except DeploymentNotFound:
            raise NotFound(f"deployment {deployment!r} does not exist") from None
        model = names.check_name(body.model or dep.roles[names.REAL].name, "model name")
        try:
            meta = self.registry.meta(model, body.version)
        except ModelNotFound:
            raise NotFound(f"model {model} version {body.version} is not in the registry") from None
        real = dep.roles[names.REAL]
        try:
            real_classes = self.registry.meta(real.name, real.version).classes
        except ModelNotFound:
            real_classes = meta.classes  # its real is gone: nothing to compare classes with
        why = unfit_for(meta, dep.feature_spec, real_classes)
        if why is not None:
            raise Invalid(f"{why} (deployment {deployment})")
        now_ms = time.time() * 1000
        request, positions = self._selection(body, now_ms, deployment)
        self._room()
        rid = new_replay_id(int(now_ms))
        report = new_report(rid, deployment, model, body.version, request, positions,
                            self.batch_rows, now_ms)  # fmt: skip
        self.store.create(deployment, report, {}, self.owner)
        self._launch(deployment, rid)
        log.info("replay %s of %s: %s v%d on %s", rid, deployment, model, body.version, request)
        return report

    @staticmethod
    def _selection(body: ReplayIn, now_ms: float, deployment: str) -> tuple[dict[str, Any], Any]:
        """The request as the report records it (``to_ms`` null: until the replay's
        creation, ``timing.created_ms``, so that a resume selects the same records), and
        positions when the body gave them."""
        if body.positions is not None:
            if body.from_ is not None or body.to is not None or body.last is not None:
                raise Invalid("give positions, or from/to, or last: not several")
            try:
                return {"positions": body.positions}, positions_from(body.positions, deployment)
            except SliceError as exc:
                raise Invalid(str(exc)) from None
        if body.last is not None and body.from_ is not None:
            raise Invalid("give from/to, or last: not both")
        try:
            from_ms = None if body.from_ is None else parse_time(body.from_, "from")
            to_ms = None if body.to is None else parse_time(body.to, "to")
        except SliceError as exc:
            raise Invalid(str(exc)) from None
        if from_ms is not None and from_ms > (now_ms if to_ms is None else to_ms):
            raise Invalid(f"from ({body.from_}) is after to ({body.to or 'now'})")
        return {"from_ms": from_ms, "to_ms": to_ms, "last": body.last}, None

    def _room(self) -> None:
        """Conflict when this gateway runs as many replays as it may (a process that saved
        its last report and is on its way out does not count)."""
        with self._lock:
            alive = [key for key, p in self._processes.items() if p.is_alive()]
        running = 0
        for dep, rid in alive:
            report = self.store.get(dep, rid)
            running += report is None or report["state"] == RUNNING
        if running >= self.concurrency:
            raise Conflict(
                f"{running} replay(s) already running on this gateway "
                f"(RDV_REPLAY_CONCURRENCY={self.concurrency}); wait or stop one"
            )

    def _watch(self, deployment: str, replay_id: str, process: BaseProcess) -> None:
        """Wait for a replay process to end. One that died without saving its end (killed,
        crashed) still held its lease, so its report read ``running`` for up to the lease's
        30 s on every gateway: the lease goes at once, and the report reads interrupted."""
        process.join()
        if process.exitcode == 0:
            return
        owners = (self.owner, f"replay-{process.pid}")
        give_up = time.monotonic() + LEASE_MS / 1000
        while True:  # Redis away (a restart): let go once it is back, not once the lease lapses
            try:
                released = self.store.release_lease(deployment, replay_id, owners)
                break
            except REDIS_FAILURES as exc:
                if time.monotonic() > give_up:
                    log.warning("replay %s of %s: its lease stays until it lapses (%s)",
                                replay_id, deployment, exc)  # fmt: skip
                    return
                time.sleep(1.0)
        if released:
            log.warning("replay %s of %s: its process ended (exit code %s) while running; "
                        "resumable", replay_id, deployment, process.exitcode)  # fmt: skip

    def _launch(self, deployment: str, replay_id: str) -> None:
        s = self.settings
        assert s.redis_url is not None
        process = multiprocessing.get_context("spawn").Process(
            target=run_process,
            args=(s.redis_url, str(s.models_dir), str(s.archive_dir), deployment, replay_id),
            kwargs={
                "pause_s": s.replay_pause_ms / 1000,
                "nice": s.shadow_nice,
                "log_level": s.log_level,
                "memory_mb": s.model_memory_mb,
                "run_limit_s": s.model_run_limit_s,
            },
            name=f"replay-{replay_id}",
            daemon=True,
        )
        with self._lock:
            self._processes = {k: p for k, p in self._processes.items() if p.is_alive()}
            self._processes[(deployment, replay_id)] = process
        process.start()
        threading.Thread(target=self._watch, args=(deployment, replay_id, process),
                         name=f"watch-replay-{replay_id}", daemon=True).start()  # fmt: skip

    def get(self, deployment: str, replay_id: str) -> dict[str, Any]:
        report = self.store.get(names.check_name(deployment, "deployment"),
                                names.check_replay_id(replay_id))  # fmt: skip
        if report is None:
            raise NotFound(f"no replay {replay_id} of deployment {deployment}")
        return report

    def list(self, deployment: str, limit: int) -> list[dict[str, Any]]:
        """The latest replays, newest first; NotFound for a deployment that does not exist
        (an empty list said nothing of a misspelt name)."""
        name = names.check_name(deployment, "deployment")
        replays = self.store.list(name, limit)
        if not replays and not self.client.exists(names.deployment_key(name)):
            raise NotFound(f"deployment {deployment!r} does not exist")
        return replays

    def cancel(self, deployment: str, replay_id: str) -> dict[str, Any]:
        """Ask the runner (on whichever gateway) to stop after its batch; answers the report
        once it stopped (or, after a few seconds, as it is)."""
        report = self.get(deployment, replay_id)
        if report["state"] != RUNNING:
            raise Conflict(f"replay {replay_id} is {report['state']}, not running")
        self.store.request_cancel(deployment, replay_id)
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while report["state"] == RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
            report = self.get(deployment, replay_id)
        return report

    def resume(self, deployment: str, replay_id: str) -> dict[str, Any]:
        """Continue an interrupted (or failed) replay from its saved position."""
        report = self.get(deployment, replay_id)
        if report["state"] in (RUNNING, DONE):
            raise Conflict(f"replay {replay_id} is {report['state']}: nothing to resume")
        self._room()
        if not self.store.take_lease(deployment, replay_id, self.owner):
            raise Conflict(f"replay {replay_id} is running")
        stored = self.store.stored(deployment, replay_id)
        assert stored is not None
        report, state = stored
        report = {**report, "state": RUNNING}
        report.pop("reason", None)
        self.store.checkpoint(deployment, report, state, self.owner)
        self._launch(deployment, replay_id)
        return report

    def close(self) -> None:
        """Stop every replay process after its batch (SIGTERM; the replays stay resumable),
        killing what is left after a bound."""
        with self._lock:
            processes = [p for p in self._processes.values() if p.is_alive()]
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + _JOIN_S
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive():
                process.kill()
                process.join(1.0)


def replay_manager(settings: Settings, client: Client, registry: ModelRegistry) -> ReplayManager:
    return ReplayManager(client, registry, settings)


def _manager(request: Request) -> ReplayManager:
    manager: ReplayManager = request.app.state.replays
    return manager


def build_replay_router(route_class: type[APIRoute], prefix: str) -> APIRouter:
    """The replay routes, behind the admin router's token check (``route_class``)."""
    router = APIRouter(prefix=f"{prefix}/deployments/{{deployment}}/replays", tags=["admin"],
                       route_class=route_class)  # fmt: skip

    @router.post("", status_code=202)
    async def start_replay(request: Request, deployment: str, body: ReplayIn) -> Any:
        """Score a version offline on archived records; 202 with the report (``id``), which
        then shows progress and, when ``done``, the figures."""
        return await run_in_threadpool(_manager(request).start, deployment, body)

    @router.get("")
    async def list_replays(
        request: Request,
        deployment: str,
        limit: Annotated[int, Query(ge=1, le=LIST_LIMIT)] = 20,
    ) -> Any:
        """The deployment's latest replays, newest first."""
        return {"replays": await run_in_threadpool(_manager(request).list, deployment, limit)}

    @router.get("/{replay_id}")
    async def show_replay(request: Request, deployment: str, replay_id: str) -> Any:
        return await run_in_threadpool(_manager(request).get, deployment, replay_id)

    @router.delete("/{replay_id}")
    async def delete_replay(request: Request, deployment: str, replay_id: str) -> Any:
        """Stop a running replay after its batch (the report stays; resume continues it)."""
        return await run_in_threadpool(_manager(request).cancel, deployment, replay_id)

    @router.post("/{replay_id}/cancel")
    async def cancel_replay(request: Request, deployment: str, replay_id: str) -> Any:
        """The same as ``DELETE``."""
        return await run_in_threadpool(_manager(request).cancel, deployment, replay_id)

    @router.post("/{replay_id}/resume", status_code=202)
    async def resume_replay(request: Request, deployment: str, replay_id: str) -> Any:
        """Continue an interrupted or failed replay from the position it saved."""
        return await run_in_threadpool(_manager(request).resume, deployment, replay_id)

    return router
