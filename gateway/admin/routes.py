"""The admin API under ``/admin``: the route table, thin routes over ``AdminService``, and
the wiring that mounts it on the app and opens the admin plane at start-up.

Every route is behind the bearer token: the router's route class is the guard's
(``gateway.admin.guard``), which checks the token before anything else a route does. An
upload's body is read by ``gateway.admin.uploads``. Whatever changes a deployment refreshes
this gateway's deployment cache at once; other gateways see it within their refresh interval
(1 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.security import HTTPBearer
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from gateway.admin.bodies import (
    MAX_ENTITIES,
    MAX_VERSION,
    AddChallenger,
    AdminError,
    CreateDeployment,
    DeploymentPatch,
    EnrichmentPatch,
    Invalid,
    Promote,
    Rollback,
    SchedulePatch,
)
from gateway.admin.guard import admin_token, guarded_route
from gateway.admin.replays import build_replay_router, replay_manager
from gateway.admin.service import AdminService
from gateway.admin.uploads import UPLOAD_DOC, read_upload
from gateway.observability.drift_view import drift_view, set_thresholds
from gateway.settings import Settings
from models.registry import ModelRegistry
from rendezvous.bus.connection import connect
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.names import check_name

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)

PREFIX = "/admin"
UPLOAD_PATH = f"{PREFIX}/models"

Actor = Annotated[
    str | None,
    Header(
        alias="X-Actor",
        max_length=128,
        pattern=r"^[\x20-\x7e]+$",  # é sent as UTF-8 was stored as Ã©, a tab as a tab
        description="who makes the change (history): printable ASCII",
    ),
]


def _digits_only(value: object) -> object:
    """A version as the paths write it, digits alone: pydantic's lax integer took ``2.0``,
    ``+02`` and `` 2`` for 2 (``DELETE /admin/models/m/1.0`` deleted version 1), where a body
    refuses ``2.0`` and the OIP routes answer 404 for ``02`` (found by a helper's fuzzing)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and value[0] != "0"):
        raise ValueError("a version is written in digits alone, without a leading zero")
    return value


Version = Annotated[int, BeforeValidator(_digits_only), Path(ge=1, le=MAX_VERSION)]


def _service(request: Request) -> AdminService:
    service: AdminService = request.app.state.admin
    return service


async def _call(method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one service method in a worker thread (file I/O, onnxruntime, sync Redis)."""
    return await run_in_threadpool(method, *args, **kwargs)


async def _changed(
    request: Request, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Like ``_call`` for a change: this gateway's deployment cache follows at once. The
    change has landed once ``method`` returns: a refresh that fails then (a failover, where
    this process's async client finds the new master after the admin's sync client did) is
    logged and left to the refresh loop (within a second), never answered 503, which said
    'Redis is unavailable' of a change made and invited a retry (a rollback sent again undoes
    itself)."""
    result = await run_in_threadpool(method, *args, **kwargs)
    try:
        await request.app.state.deployments.refresh()
    except REDIS_FAILURES as exc:
        log.warning("the change is made; this gateway's deployment cache follows at its next "
                    "refresh (%s: %s)", type(exc).__name__, exc)  # fmt: skip
    return result


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        prefix=PREFIX,
        tags=["admin"],
        route_class=guarded_route(admin_token(settings)),
        dependencies=[Depends(HTTPBearer(auto_error=False))],  # documents the scheme
        responses={
            401: {"description": "no bearer token"},
            403: {"description": "wrong token"},
            404: {"description": "not found, or the admin API is off"},
        },
    )

    @router.post(
        "/models",
        status_code=201,
        openapi_extra=UPLOAD_DOC,
        responses={
            413: {"description": "artifact too large"},
            415: {"description": "neither multipart nor JSON"},
            422: {"description": "not ONNX, wrong width, bad metadata"},
        },
    )
    async def upload_model(request: Request, actor: Actor = None) -> Any:
        """Upload an ONNX model (checked in onnxruntime) as a new version."""
        meta, data = await read_upload(request, settings.max_model_bytes)
        return await _call(_service(request).upload, meta, data, actor or "admin")

    @router.get("/models")
    async def list_models(request: Request, name: str | None = None) -> Any:
        """Every model version (optionally of one name), with the roles it holds."""
        return {"models": await _call(_service(request).models, name)}

    @router.get("/models/{name}")
    async def model_versions(request: Request, name: str) -> Any:
        """The versions of one model."""
        check_name(name, "model name")  # 422, as for one of its versions
        versions = await _call(_service(request).models, name)
        if not versions:
            raise AdminError(f"no model {name!r} in the registry", status=404)
        return {"name": name, "versions": versions}

    @router.get("/models/{name}/{version}")
    async def show_model(request: Request, name: str, version: Version) -> Any:
        """One version's metadata, sha256 and roles."""
        return await _call(_service(request).model, name, version)

    @router.delete("/models/{name}/{version}")
    async def delete_model(
        request: Request, name: str, version: Version, actor: Actor = None
    ) -> Any:
        """Delete a version that holds no role in any deployment."""
        return await _call(_service(request).delete_model, name, version, actor or "admin")

    @router.get("/deployments")
    async def list_deployments(request: Request) -> Any:
        return {"deployments": await _call(_service(request).deployments)}

    @router.post("/deployments", status_code=201)
    async def create_deployment(
        request: Request, body: CreateDeployment, actor: Actor = None
    ) -> Any:
        """A new deployment: the real model's feature spec, an optional canary, a schedule."""
        return await _changed(request, _service(request).create_deployment, body, actor or "admin")

    @router.get("/deployments/{deployment}")
    async def show_deployment(request: Request, deployment: str) -> Any:
        """Roles, schedule, revision, feature names and live workers per role."""
        return await _call(_service(request).deployment, deployment)

    @router.get("/deployments/{deployment}/history")
    async def history(
        request: Request, deployment: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> Any:
        """Every change (and refused promotion), oldest first."""
        return {"history": await _call(_service(request).history, deployment, limit)}

    @router.get("/deployments/{deployment}/shadow")
    async def shadow(request: Request, deployment: str) -> Any:
        """Each non-real role's record against real over the recent decision records."""
        return await _call(_service(request).shadow, deployment)

    @router.post("/deployments/{deployment}/promote")
    async def promote(request: Request, deployment: str, body: Promote, actor: Actor = None) -> Any:
        """Make a version real; the old real becomes the canary. 409 with the figures when
        it falls short of the requested shadow evidence (unless forced)."""
        return await _changed(
            request, _service(request).promote, deployment, body, actor or "admin"
        )

    @router.post("/deployments/{deployment}/rollback")
    async def rollback(
        request: Request, deployment: str, body: Rollback | None = None, actor: Actor = None
    ) -> Any:
        """Restore the roles and schedule of the previous (or a given) revision."""
        return await _changed(
            request, _service(request).rollback, deployment, body or Rollback(), actor or "admin"
        )

    @router.post("/deployments/{deployment}/challengers", status_code=201)
    async def add_challenger(
        request: Request, deployment: str, body: AddChallenger, actor: Actor = None
    ) -> Any:
        """A shadow role that scores every request from now on (no replay of history)."""
        return await _changed(
            request, _service(request).add_challenger, deployment, body, actor or "admin"
        )

    @router.delete("/deployments/{deployment}/challengers/{role}")
    async def remove_challenger(
        request: Request,
        deployment: str,
        role: str,
        reason: Annotated[str, Query(max_length=2000)] = "",
        expect_revision: Annotated[
            int | None,
            Query(ge=1, description="refuse (409) unless the deployment is still at this revision"),
        ] = None,
        actor: Actor = None,
    ) -> Any:
        return await _changed(
            request,
            _service(request).remove_challenger,
            deployment,
            role,
            actor or "admin",
            reason,
            expect_revision,
        )

    @router.delete("/deployments/{deployment}", status_code=202)
    async def delete_deployment(
        request: Request,
        deployment: str,
        reason: Annotated[str, Query(max_length=2000)] = "",
        actor: Actor = None,
    ) -> Any:
        """Take no new request (404 from now on); what it accepted is still answered, scored
        and archived, then its state and streams are purged (its history stays)."""
        return await _changed(
            request, _service(request).delete_deployment, deployment, actor or "admin", reason
        )

    @router.patch("/deployments/{deployment}")
    async def patch_deployment(
        request: Request, deployment: str, body: DeploymentPatch, actor: Actor = None
    ) -> Any:
        """Change how many input streams (``partitions``) requests are spread over."""
        return await _changed(
            request, _service(request).set_partitions, deployment, body, actor or "admin"
        )

    @router.patch("/deployments/{deployment}/schedule")
    async def set_schedule(
        request: Request, deployment: str, body: SchedulePatch, actor: Actor = None
    ) -> Any:
        """Change the real deadline, timeout, fallback order, grace period or A/B split."""
        return await _changed(
            request, _service(request).set_schedule, deployment, body, actor or "admin"
        )

    @router.patch("/deployments/{deployment}/enrichment")
    async def set_enrichment(
        request: Request, deployment: str, body: EnrichmentPatch, actor: Actor = None
    ) -> Any:
        """Declare which features are looked up by entity from the online store (``lookup``:
        key, features, defaults), or stop looking up (``null``). Recorded in the history."""
        return await _changed(
            request, _service(request).set_enrichment, deployment, body, actor or "admin"
        )

    @router.put("/deployments/{deployment}/entities")
    async def load_entities(
        request: Request,
        deployment: str,
        body: Annotated[list[dict[str, Any]], Body(max_length=MAX_ENTITIES)],
        actor: Actor = None,
    ) -> Any:
        """Write entities' features to the online store: a JSON array of objects, each the
        lookup's key and some of its features (``{"customer_id": "c-17", "f": 1.5}``). All or
        nothing; at most 10,000 entities and RDV_MAX_BODY_BYTES a call."""
        done = await _call(_service(request).load_entities, deployment, body, actor or "admin")
        log.info("%d entities of %s loaded by %s", done["loaded"], deployment, actor or "admin")
        return done

    @router.get("/deployments/{deployment}/entities/{name:path}")
    async def show_entity(request: Request, deployment: str, name: str) -> Any:
        """One entity's stored features (``name``: its key, e.g. ``c-17``; a key with a
        ``/`` in it, as ``acct/17``, is read too: it was a 404 however it was escaped)."""
        return await _call(_service(request).entity, deployment, name)

    @router.delete("/deployments/{deployment}/entities/{name:path}")
    async def delete_entity(
        request: Request, deployment: str, name: str, actor: Actor = None
    ) -> Any:
        """Remove one entity's stored features; 404 if the store has none."""
        done = await _call(_service(request).delete_entity, deployment, name, actor or "admin")
        log.info("entity %r of %s deleted by %s", name, deployment, actor or "admin")
        return done

    @router.get("/deployments/{deployment}/drift/thresholds")
    async def drift_thresholds(request: Request, deployment: str) -> Any:
        """The drift thresholds in force (the defaults where the deployment has none)."""
        await _known(request, deployment)
        view = await drift_view(request.app.state.redis, deployment, settings.drift_defaults(),
                                history=1, events=1)  # fmt: skip
        return view["thresholds"]

    @router.put("/deployments/{deployment}/drift/thresholds")
    async def set_drift_thresholds(
        request: Request, deployment: str, body: dict[str, Any], actor: Actor = None
    ) -> Any:
        """Change some of the thresholds (the rest keep their value; ``null`` puts one back
        to its default); applies from the next evaluation, raising or clearing alerts against
        the new values."""
        await _known(request, deployment)
        try:
            updated = await set_thresholds(request.app.state.redis, deployment, body,
                                           settings.drift_defaults(),
                                           settings.drift_window_requests)  # fmt: skip
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        log.info("drift thresholds of %s set by %s: %s", deployment, actor or "admin", body)
        return updated.to_dict()

    return router


async def _known(request: Request, deployment: str) -> None:
    """404 unless the deployment exists: this process's cache, else Redis (a deployment just
    created through another gateway process answered 404 here for up to a second, where the
    other admin routes, which read Redis, found it; a helper's churn probe)."""
    check_name(deployment, "deployment")
    if deployment not in request.app.state.deployments.deployments:
        await _call(_service(request).require, deployment)


def install_admin(app: FastAPI, settings: Settings) -> None:
    app.include_router(build_router(settings))
    app.include_router(build_replay_router(guarded_route(admin_token(settings)), PREFIX))


async def start_admin(app: FastAPI, settings: Settings) -> Callable[[], None]:
    """Open the admin plane (its own Redis client; models found on disk are indexed) and say
    in the log whether the admin API is on. Returns what closes it."""
    app.state.admin = None
    if admin_token(settings) is None:
        log.warning("admin API is off: RDV_ADMIN_TOKEN is not set (every /admin route answers 404)")
        return lambda: None
    assert settings.redis_url is not None
    client = await run_in_threadpool(connect, settings.redis_url, 30.0, settings.redis_timeout_s)
    registry = ModelRegistry(settings.models_dir, index=client)
    adopted = await run_in_threadpool(registry.adopt)
    app.state.admin = AdminService(
        client,
        registry,
        default_schedule=settings.schedule(),
        max_model_bytes=settings.max_model_bytes,
        shadow_window=settings.shadow_window,
        labelled_window=settings.accuracy_window,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
    )
    app.state.replays = replay_manager(settings, client, registry)
    log.info(
        "admin API is on under %s (bearer token); %d model versions found on disk were indexed",
        PREFIX,
        len(adopted),
    )

    def close() -> None:
        app.state.replays.close()  # runners stop after their batch, resumable
        client.close()

    return close
