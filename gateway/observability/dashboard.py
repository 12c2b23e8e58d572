"""``GET /dashboard/{deployment}``: the drift report as charts for a person to look at.

The page is static files in package data (``gateway/observability/static``: the HTML, its
stylesheet, its script, the feature view's script and the live-accuracy section's script),
served as they are: no build step, no templating, nothing fetched from the internet. The
scripts read the deployment from the page's URL and ask ``/v1/deployments/{deployment}/drift``
(and its feature view ``.../drift/features``), so an unknown deployment shows that endpoint's
error and the dashboard needs no Redis access of its own.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from rendezvous import names

STATIC_URL = "/dashboard/static"
PAGE_FILE = "dashboard.html"
# The files served under STATIC_URL, by name, with their content types: nothing else is.
ASSET_TYPES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "application/javascript; charset=utf-8",
    "drift_features.js": "application/javascript; charset=utf-8",
    "accuracy.js": "application/javascript; charset=utf-8",
}

# Only the gateway's own files may run or style the page, and it may talk to its own origin
# alone: no inline script or style, no CDN or font, and injected markup could not execute.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def static_files() -> dict[str, StaticFile]:
    """The page and its assets, read once from package data. The names are unversioned, so
    browsers revalidate (``no-cache``) and an unchanged file costs only a 304."""
    folder = resources.files("gateway.observability").joinpath("static")
    types = {PAGE_FILE: "text/html; charset=utf-8", **ASSET_TYPES}
    out = {}
    for name, media_type in types.items():
        body = folder.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        out[name] = StaticFile(body, media_type, etag)
    return out


def serve(
    request: Request, file: StaticFile, extra: dict[str, str] | None = None, status: int = 200
) -> Response:
    headers = {
        "Cache-Control": "no-cache",
        "ETag": file.etag,
        "X-Content-Type-Options": "nosniff",
        **(extra or {}),
    }
    if status == 200 and file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, status_code=status, media_type=file.media_type, headers=headers)


def dashboard_router() -> APIRouter:
    router = APIRouter()
    files = static_files()  # read now: a missing file fails the app's start, not a request

    @router.get(STATIC_URL + "/{name}", include_in_schema=False)
    async def dashboard_static(name: str, request: Request) -> Response:
        """The page's stylesheet and scripts, looked up by exact name among ``ASSET_TYPES``."""
        if name not in ASSET_TYPES:
            raise HTTPException(404, "no such dashboard file")
        return serve(request, files[name])

    @router.get("/dashboard/{deployment}", response_class=HTMLResponse)
    async def dashboard(deployment: str, request: Request) -> Response:
        """Divergence and drift over time, score distributions (real, canary, reference), the
        top drifting features, active alerts and the latest events; redrawn every 5 s from
        ``/v1/deployments/{deployment}/drift``; and the feature view (``?feature=`` preselects
        one) from ``/v1/deployments/{deployment}/drift/features``."""
        try:
            names.check_name(deployment, "deployment")
        except names.InvalidName as exc:
            raise HTTPException(422, str(exc)) from None
        policy = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}
        # An unknown deployment's page says so itself (its report answers 404) and comes to
        # life once the deployment exists; its status says so to anything else that looks.
        cache = getattr(request.app.state, "deployments", None)  # None: not started yet
        known = cache is None or deployment in cache.deployments
        return serve(request, files[PAGE_FILE], policy, 200 if known else 404)

    return router
