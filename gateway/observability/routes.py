"""Read-only routes for dashboards: ``/metrics``, ``/v1/deployments/{deployment}/drift`` and its
feature view ``/v1/deployments/{deployment}/drift/features``."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import UnknownDeployment
from gateway.observability import drift_features
from gateway.observability.cluster_state import read_state
from gateway.observability.drift_view import drift_view
from gateway.observability.kept_state import KeptState
from gateway.observability.live_accuracy import accuracy_view
from gateway.observability.metrics import GatewayMetrics, multiprocess_dir
from gateway.observability.metrics_state import state_registry
from gateway.problems import Problem
from rendezvous import names
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.drift_reference import FeatureReference


def observe_router() -> APIRouter:
    router = APIRouter()
    kept = KeptState(multiprocess_dir())

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text format: this gateway's counters (summed over its processes in
        multi-process mode), then the cluster state read from Redis. Without Redis the first
        part is still served, so a scrape shows the outage instead of failing, with the
        cluster state this process last read (``KeptState``)."""
        state = request.app.state
        instruments: GatewayMetrics = state.metrics
        deployments: DeploymentCache = state.deployments
        live = {*deployments.deployments, *deployments.draining}
        # In a thread: in multi-process mode the merge reads every process's files, which keep
        # the series of every deployment ever served (0.3 s at 280 deleted ones, found by a
        # helper's churn probe), and it held the event loop, predicts included.
        body = await asyncio.to_thread(generate_latest, instruments.scrape_registry(live))
        try:
            cluster = await asyncio.wait_for(
                read_state(
                    state.redis,
                    {n: d.input_streams for n, d in sorted(deployments.deployments.items())},
                    state.settings.heartbeat_timeout_s,
                    {n: d.roles for n, d in deployments.deployments.items()},
                ),
                timeout=state.settings.redis_timeout_s,
            )
            kept.read(generate_latest(state_registry(cluster)), time.monotonic())
        except REDIS_FAILURES:
            kept.missed()
        return Response(body + kept.served(time.monotonic()), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/deployments/{deployment}/drift")
    async def drift(deployment: str, request: Request) -> JSONResponse:
        """The latest drift evaluation: window statistics, thresholds, active alerts, the
        latest events and a short history (oldest first); ``accuracy``: the live accuracy on
        labelled requests and its history."""
        refused = _unknown(request, deployment)
        if refused is not None:
            return refused
        settings = request.app.state.settings
        view = await asyncio.wait_for(
            drift_view(
                request.app.state.redis,
                deployment,
                settings.drift_defaults(),
                history=settings.drift_history,
            ),
            timeout=settings.redis_timeout_s,
        )
        view["accuracy"] = await asyncio.wait_for(
            accuracy_view(request.app.state.redis, deployment, history=settings.drift_history),
            timeout=settings.redis_timeout_s,
        )
        # who holds each role now, which an idle window cannot say
        roles = request.app.state.deployments.deployments[deployment].roles
        view["roles"] = {role: str(ref) for role, ref in roles.items()}
        return JSONResponse(view)

    @router.get("/v1/deployments/{deployment}/drift/features")
    async def drift_feature(
        deployment: str, request: Request, feature: str | None = None
    ) -> JSONResponse:
        """One feature (``?feature=``; default: the one drifting most) in the latest window
        against training: rows per training decile and outside the training range, the
        training statistics, its out-of-range rate and PSI over time, and every feature's
        latest PSI and out-of-range rate."""
        refused = _unknown(request, deployment)
        if refused is not None:
            return refused
        deployments: DeploymentCache = request.app.state.deployments
        spec = deployments.deployments[deployment].feature_spec
        settings = request.app.state.settings
        try:
            view = await asyncio.wait_for(
                drift_features.read_view(
                    request.app.state.redis,
                    deployment,
                    spec,
                    FeatureReference.from_spec(spec),
                    feature,
                    settings.drift_history,
                ),
                timeout=settings.redis_timeout_s,
            )
        except drift_features.UnknownFeature as exc:
            return Problem(404, str(exc)).response()
        return JSONResponse(view)

    return router


def _unknown(request: Request, deployment: str) -> JSONResponse | None:
    """422 for a name that cannot be a deployment's; an unknown deployment raises (404)."""
    try:
        names.check_name(deployment, "deployment")
    except names.InvalidName as exc:
        return Problem(422, str(exc)).response()
    if deployment not in request.app.state.deployments.deployments:
        raise UnknownDeployment(f"deployment {deployment!r} does not exist")
    return None
