"""The FastAPI app: predict, health and readiness routes, wired in one lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import redis
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.multiprocess import mark_process_dead
from starlette.types import ASGIApp

from gateway.admin.routes import UPLOAD_PATH, install_admin, start_admin
from gateway.admin.schema import install_schema
from gateway.admin.uploads import upload_body_cap
from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.feedback import FeedbackService, ModelClasses
from gateway.dataplane.matcher import Rendezvous
from gateway.dataplane.outcome_store import OutcomeStore
from gateway.dataplane.realtime_first import RealtimeFirst
from gateway.dataplane.service import PredictionService
from gateway.dataplane.validation import PredictRequest
from gateway.observability.alert_webhooks import AlertWebhooks
from gateway.observability.dashboard import dashboard_router
from gateway.observability.drift_feed import DriftFeed
from gateway.observability.drift_monitor import DriftMonitor
from gateway.observability.drift_online import OnlineDrift
from gateway.observability.drift_sketches import local_model_meta
from gateway.observability.live_accuracy import LiveAccuracy
from gateway.observability.metrics import GatewayMetrics, multiprocess_dir
from gateway.observability.routes import observe_router
from gateway.problems import AsciiJSONResponse
from gateway.settings import Settings
from gateway.transport import feedback, jobs, oip
from gateway.transport.cors import with_cors
from gateway.transport.expect_continue import CloseUnreadContinue
from gateway.transport.fast_path import PredictFastPath, predict_reply, refused_body_counter
from gateway.transport.head import HeadAsGet
from gateway.transport.http_guard import REFUSALS
from gateway.transport.limits import BodySizeLimit
from gateway.transport.readiness import readiness
from gateway.transport.refusals import install_refusals
from gateway.transport.vital_tasks import VitalTasks, keep_serving, stop_this_process
from rendezvous import liveness, names
from rendezvous.bus.appender import StreamAppender
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import AsyncClient, connect_async
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.redis_needs import RedisUnfit, check_async
from rendezvous.decision import DecisionRecord
from rendezvous.heap import settle_heap, trim_heap_every

log = logging.getLogger(__name__)


def instance_id() -> str:
    """Unique per gateway process: the name of its reply stream."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


async def _check_redis(client: AsyncClient, settings: Settings, deployments: int) -> None:
    """Refuse a Redis that cannot carry the system (``rendezvous.bus.redis_needs``: scripts,
    no eviction), and warn when the caps let the data outgrow its ``maxmemory``: at the limit
    Redis refuses writes and predicts answer 503. Read from ``INFO memory``: ``CONFIG`` is
    often disabled on managed Redis."""
    try:
        info = await check_async(client, allow_eviction=settings.allow_eviction)
    except RedisUnfit as exc:
        log.critical("%s", exc)
        raise
    except REDIS_FAILURES as exc:
        log.warning("cannot read Redis's memory limit: %s", exc)
        return
    limit = int(info.get("maxmemory", 0) or 0) if info is not None else 0
    needed = settings.redis_memory_bytes(max(deployments, 1))
    if limit and needed > limit:
        log.warning(
            "Redis's maxmemory is %d MB, and the caps let the data reach about %d MB: at the "
            "limit predicts answer 503. Lower RDV_MAX_BACKLOG (%d), RDV_DECISIONS_MAXLEN (%d) "
            "or RDV_DECISIONS_MAX_MB, "
            "RDV_DRIFT_SKETCH_MAXLEN (%d), RDV_REPLY_MAXLEN (%d), RDV_FEEDBACK_MAX_MB (%g), "
            "RDV_LABELLED_MAXLEN (%d) and RDV_JOB_MAX_HELD_BYTES (%d), or raise maxmemory",
            limit // 2**20, needed // 2**20, settings.max_backlog, settings.decisions_maxlen,
            settings.drift_sketch_maxlen, settings.reply_maxlen, settings.feedback_max_mb,
            settings.labelled_maxlen, settings.job_max_held_bytes,
        )  # fmt: skip


def serving_app(settings: Settings | None = None) -> ASGIApp:
    """What uvicorn serves: predict answered ahead of the framework
    (``gateway.transport.fast_path``), everything else by ``create_app``'s FastAPI app, and
    both behind CORS when ``RDV_CORS_ORIGINS`` names origins (``gateway.transport.cors``)."""
    settings = settings or Settings()
    served = PredictFastPath(
        create_app(settings, owns_process=True), max_body_bytes=settings.max_body_bytes
    )
    return with_cors(CloseUnreadContinue(served), settings.cors_origins)


def create_app(
    settings: Settings | None = None,
    *,
    owns_process: bool = False,
    on_vital_death: Callable[[str], None] | None = None,
) -> FastAPI:
    """The gateway as a FastAPI app. ``owns_process``: the process serves only this app, not
    merely mounts it (a test): once started, tune the garbage collector for it
    (``rendezvous.heap``), and stop it if a vital background task ends
    (``gateway.transport.vital_tasks``; ``on_vital_death`` says what to do instead, and a
    process that does not own itself only logs it)."""
    settings = settings or Settings()
    if on_vital_death is None:
        on_vital_death = stop_this_process if owns_process else keep_serving

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise RuntimeError("the gateway needs RDV_REDIS_URL (rdv serve sets it for you)")
        # A start that fails part way stops what it started: a reply reader left running
        # held the process alive after uvicorn's 'Application startup failed', serving
        # nothing, with no exit for its supervisor to see (found by hand).
        async with contextlib.AsyncExitStack() as undo:
            client = await connect_async(
                settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                max_connections=settings.redis_max_connections,
            )
            undo.push_async_callback(client.aclose)
            # The hot path's routers (see rendezvous.bus.async_router): the writer on the client's
            # connections, the reader on a client of its own, so that closing it ends its blocking
            # XREAD (up to 1 s, which its timeout must outlast) and nothing else.
            writer = Router(client, timeout_s=settings.redis_timeout_s)
            undo.push_async_callback(writer.close)
            reader_client = await connect_async(
                settings.redis_url, timeout_s=settings.redis_timeout_s
            )
            undo.push_async_callback(reader_client.aclose)
            reader = Router(reader_client, timeout_s=settings.redis_timeout_s + 1)
            deployments = DeploymentCache(client, settings.heartbeat_timeout_s)
            await deployments.refresh()
            await _check_redis(client, settings, len(deployments.deployments))
            appender = StreamAppender(
                writer,
                wait_replicas=settings.wait_replicas,
                wait_timeout_ms=settings.wait_replicas_timeout_ms,
            )
            undo.push_async_callback(appender.close)
            instance = instance_id()
            webhooks = AlertWebhooks(settings.alert_webhooks, external_url=settings.public_url)
            undo.push_async_callback(webhooks.close)
            online = OnlineDrift(
                client,
                deployments,
                instance,
                local_meta=local_model_meta(settings.models_dir),
            )
            undo.push_async_callback(online.close)
            feed = DriftFeed(
                client,
                deployments,
                maxlen=settings.drift_sketch_maxlen,
                on_dropped=metrics.drift_rows_dropped,
                online=online,
            )

            outcomes = OutcomeStore(
                client,
                retention_s=settings.feedback_retention_s,
                bucket_s=settings.feedback_bucket_s,
                max_bytes=int(settings.feedback_max_mb * 2**20),
            )

            def on_decision(record: DecisionRecord) -> None:
                metrics.decision(record)
                feed.observe_decision(record)
                outcomes.observe(record)

            # async jobs' long steps go between realtime's
            realtime_first = RealtimeFirst(yield_s=settings.job_yield_ms / 1000)
            rendezvous = Rendezvous(
                client,
                reader,
                names.reply_stream(instance),
                appender,
                decisions_maxlen=settings.decisions_maxlen,
                decisions_max_bytes=int(settings.decisions_max_mb * 2**20),
                on_decision=on_decision,
                on_late=metrics.late_result,
                realtime_first=realtime_first,
            )
            await rendezvous.start()
            undo.push_async_callback(rendezvous.stop)
            monitor = DriftMonitor(
                client,
                deployments,
                instance,
                interval_s=settings.drift_interval_s,
                window_requests=settings.drift_window_requests,
                window_s=settings.drift_window_s,
                history_len=settings.drift_history,
                defaults=settings.drift_defaults(),
                local_meta=local_model_meta(settings.models_dir),
                webhooks=webhooks,
            )
            classes = ModelClasses(client, local_model_meta(settings.models_dir))
            accuracy = LiveAccuracy(
                client, deployments, instance, window=settings.accuracy_window, classes_of=classes
            )
            app.state.feedback = FeedbackService(
                client,
                deployments,
                outcomes,
                max_items=settings.max_rows,
                labelled_maxlen=settings.labelled_maxlen,
                classes_of=classes,
                class_names_of=classes.class_names,
                request_id_ttl_s=settings.request_id_ttl_s,
            )
            background = {
                "the outcome store": asyncio.create_task(outcomes.run()),
                "live accuracy": asyncio.create_task(accuracy.run()),
                "the deployments refresh": asyncio.create_task(deployments.run()),
                "the drift feed": asyncio.create_task(feed.run()),
                "the drift monitor": asyncio.create_task(monitor.run()),
                "the online drift judge": asyncio.create_task(online.run()),
            }
            for task in background.values():
                undo.callback(task.cancel)
            close_admin = await start_admin(app, settings)
            undo.callback(close_admin)
            app.state.settings = settings
            app.state.redis = client
            app.state.deployments = deployments
            app.state.rendezvous = rendezvous
            app.state.service = PredictionService(
                deployments,
                rendezvous,
                appender,
                max_rows=settings.max_rows,
                max_in_flight=settings.max_in_flight,
                max_backlog=settings.max_backlog,
                max_backlog_bytes=settings.max_backlog_bytes,
                request_id_ttl_s=settings.request_id_ttl_s,
                metrics=metrics,
                drift_feed=feed,
                feature_store=writer,
                realtime_first=realtime_first,
            )
            metrics.track_in_flight(lambda: app.state.service.held)
            metrics.track_decision_appends(appender)
            REFUSALS.listener = metrics.track_http_refusals(REFUSALS.by_status)
            stop_jobs = await jobs.start(app, settings)
            undo.push_async_callback(stop_jobs)
            vital = VitalTasks(on_vital_death)
            vitals = {**background, "the reply reader": rendezvous.reader_task,
                      "the jobs supervisor": app.state.jobs.supervisor_task}  # fmt: skip
            for name, maybe in vitals.items():
                if maybe is not None:
                    vital.watch(name, maybe)
            app.state.vital_tasks = vital
            if owns_process:
                settle_heap()  # then trimmed (not a vital task: a missed trim is harmless)
                background["the heap trim"] = asyncio.create_task(trim_heap_every())
                background["the liveness beat"] = asyncio.create_task(liveness.beat_every())
            undo.pop_all()  # started: the shutdown below stops it all, in its order
        log.info("gateway ready: deployments %s, reply stream %s",
                 sorted(deployments.deployments), rendezvous.reply_to)  # fmt: skip
        try:
            yield
        finally:
            vital.stopping()
            await stop_jobs()
            for task in background.values():
                task.cancel()
            close_admin()
            await online.close()
            await webhooks.close()
            await rendezvous.stop()
            with contextlib.suppress(redis.RedisError, OSError):
                await asyncio.wait_for(feed.flush(), timeout=settings.redis_timeout_s)
            with contextlib.suppress(redis.RedisError, OSError):
                await asyncio.wait_for(outcomes.flush(), timeout=settings.redis_timeout_s)
            with contextlib.suppress(redis.RedisError, OSError):
                await asyncio.wait_for(monitor.release(), timeout=settings.redis_timeout_s)
            with contextlib.suppress(redis.RedisError, OSError):
                await asyncio.wait_for(accuracy.release(), timeout=settings.redis_timeout_s)
            metrics.flush()
            if multiprocess_dir() is not None:
                mark_process_dead(os.getpid())
            await appender.close()
            await writer.close()
            await client.aclose()
            await reader_client.aclose()

    app = FastAPI(
        default_response_class=AsciiJSONResponse,
        title="Rendezvous gateway",
        version="0.1.0",
        summary="One prediction endpoint; real, canary and log bin behind Redis streams.",
        lifespan=lifespan,
        openapi_url=None,  # gateway.admin.schema serves it, admin routes only with the token
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        BodySizeLimit,
        max_body_bytes=settings.max_body_bytes,
        path_limits={UPLOAD_PATH: upload_body_cap(settings)},
        on_refused=refused_body_counter(app),
    )
    app.add_middleware(HeadAsGet)  # HEAD on every GET route (gateway.transport.head)
    install_admin(app, settings)
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    app.include_router(observe_router())
    app.include_router(dashboard_router())
    oip.mount(app, settings)
    jobs.mount(app, settings)
    feedback.mount(app, settings)

    install_refusals(app)

    @app.post(
        "/v1/deployments/{deployment}/predict",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            404: {"description": "unknown deployment"},
            413: {"description": "body too large"},
            422: {"description": "invalid input; the detail names each field at fault"},
            429: {"description": "this gateway is at its in-flight bound"},
            503: {"description": "Redis unavailable or the input stream is backlogged"},
            504: {"description": "no model answered within the deployment's timeout"},
        },
    )
    async def predict(
        deployment: str,
        request: Request,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Score the input with the deployment's real model (or the schedule's fallback).

        ``rdv gateway`` answers predict ahead of the framework (``gateway.transport.fast_path``);
        this route documents it in the OpenAPI schema and answers a path the fast path leaves
        to the framework, through the same ``predict_reply``."""
        status, body, headers = await predict_reply(
            request.app.state.service, deployment, await request.body(), x_request_id
        )
        head = {name.decode(): value.decode() for name, value in headers}
        return Response(body, status, head, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (says nothing about Redis or workers)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Ready when this process reads its replies and every deployment answers with a live
        real worker (``gateway.transport.readiness``)."""
        service = request.app.state.service
        deployments = request.app.state.deployments.deployments
        status, doc, headers = await readiness(
            request.app.state.redis,
            deployments,
            settings.heartbeat_timeout_s,
            request.app.state.rendezvous.read_failure,
            backlogged={
                d: refused[1]
                for d in deployments
                if (refused := service.backlog.refusal(d)) is not None
            },
        )
        return JSONResponse(doc, status_code=status, headers=headers)

    install_schema(app, settings)
    return app
