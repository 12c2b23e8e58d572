"""Replays under ``/admin/deployments/{d}/replays``: start, watch, stop and resume offline
scorings of a model version on the archive (``models.replay``).

A replay runs in a thread of the gateway process that accepted it (at most
``RDV_REPLAY_CONCURRENCY`` at once), never on the event loop: onnxruntime releases the GIL
while it scores a batch, and ``RDV_REPLAY_PAUSE_MS`` between batches leaves the cores to live
traffic. Reports live in Redis, so any gateway answers for any replay, a stop asked of one
gateway reaches the runner on another, and a replay whose gateway went away resumes anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gateway.admin.bodies import MAX_VERSION, Conflict, Invalid, NotFound
from gateway.settings import Settings
from models.archive import ArchiveReader
from models.archive_slice import MAX_LAST, SliceError, parse_time, positions_from
from models.deployment_store import DeploymentStore
from models.deployments import DeploymentNotFound
from models.registry import ModelNotFound, ModelRegistry
from models.replay import Runner, new_report
from models.replay_store import DONE, LIST_LIMIT, RUNNING, ReplayStore, new_replay_id
from rendezvous import names
from rendezvous.bus.connection import Client

log = logging.getLogger(__name__)

_JOIN_S = 10.0
_CANCEL_WAIT_S = 5.0


class ReplayIn(BaseModel):
    """A replay's request: a version, and which archived records (a time range, the last N,
    or the positions of an earlier report; nothing: everything archived until now)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
    """Starts replay threads and answers for stored reports (synchronous: call it from a
    worker thread)."""

    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        reader: ArchiveReader,
        *,
        batch_rows: int,
        pause_ms: float,
        concurrency: int,
    ):
        self.client = client
        self.registry = registry
        self.reader = reader
        self.store = ReplayStore(client)
        self.batch_rows = batch_rows
        self.pause_s = pause_ms / 1000
        self.concurrency = concurrency
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
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
        if meta.feature_spec.width != dep.feature_spec.width:
            raise Invalid(f"model {model} version {body.version} takes "
                          f"{meta.feature_spec.width} features, {deployment} has "
                          f"{dep.feature_spec.width}")  # fmt: skip
        now_ms = time.time() * 1000
        request, positions = self._selection(body, now_ms)
        self._room()
        rid = new_replay_id(int(now_ms))
        report = new_report(rid, deployment, model, body.version, request, positions,
                            self.batch_rows, now_ms)  # fmt: skip
        self.store.create(deployment, report, {}, self.owner)
        self._launch(deployment, rid)
        log.info("replay %s of %s: %s v%d on %s", rid, deployment, model, body.version, request)
        return report

    @staticmethod
    def _selection(body: ReplayIn, now_ms: float) -> tuple[dict[str, Any], Any]:
        """The request as the report records it (``to_ms`` null: until the replay's
        creation, ``timing.created_ms``, so that a resume selects the same records), and
        positions when the body gave them."""
        if body.positions is not None:
            if body.from_ is not None or body.to is not None or body.last is not None:
                raise Invalid("give positions, or from/to, or last: not several")
            try:
                return {"positions": body.positions}, positions_from(body.positions)
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
        with self._lock:
            running = sum(t.is_alive() for t in self._threads.values())
        if running >= self.concurrency:
            raise Conflict(
                f"{running} replay(s) already running on this gateway "
                f"(RDV_REPLAY_CONCURRENCY={self.concurrency}); wait or stop one"
            )

    def _launch(self, deployment: str, replay_id: str) -> None:
        runner = Runner(self.client, self.registry, self.reader, owner=self.owner,
                        pause_s=self.pause_s, stop=self._stop)  # fmt: skip

        def run() -> None:
            try:
                runner.run(deployment, replay_id)
            except Exception:  # Redis gone at the end: the lease lapses, the report says so
                log.exception("replay %s of %s could not save its end", replay_id, deployment)

        thread = threading.Thread(target=run, name=f"replay-{replay_id}", daemon=True)
        with self._lock:
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            self._threads[replay_id] = thread
        thread.start()

    def get(self, deployment: str, replay_id: str) -> dict[str, Any]:
        report = self.store.get(names.check_name(deployment, "deployment"),
                                names.check_replay_id(replay_id))  # fmt: skip
        if report is None:
            raise NotFound(f"no replay {replay_id} of deployment {deployment}")
        return report

    def list(self, deployment: str, limit: int) -> list[dict[str, Any]]:
        return self.store.list(names.check_name(deployment, "deployment"), limit)

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
        """Stop every runner after its batch (their replays stay resumable)."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads.values())
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


def replay_manager(settings: Settings, client: Client, registry: ModelRegistry) -> ReplayManager:
    return ReplayManager(
        client,
        registry,
        ArchiveReader(settings.archive_dir),
        batch_rows=settings.replay_batch_rows,
        pause_ms=settings.replay_pause_ms,
        concurrency=settings.replay_concurrency,
    )


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
