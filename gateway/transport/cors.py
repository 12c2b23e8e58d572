"""Cross-origin calls from browser apps (CORS), for the origins ``RDV_CORS_ORIGINS`` names.

A browser refuses a page's call to another origin unless that origin answers for it: a
preflight ``OPTIONS`` for a JSON ``POST``, then ``Access-Control-Allow-Origin`` on the answer.
Starlette's ``CORSMiddleware`` does both; it wraps the whole served app, predict's fast path
included, and only when origins are configured: without them nothing is added to a request's
path and cross-origin calls stay refused by the browser (the default, as before).
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
REQUEST_HEADERS = (
    "authorization",  # the admin and feedback tokens
    "content-encoding",  # refused 415 all the same, but with a readable answer
    "inference-header-content-length",  # the Open Inference Protocol's binary bodies
    "x-request-id",
)
"""Headers a caller sends beyond those a browser always allows (``Content-Type`` among them)."""
EXPOSED_HEADERS = ("location", "retry-after", "inference-header-content-length")
"""Answer headers a page may read: a job's location, when to retry a 429/503, a binary answer's
JSON length."""
MAX_AGE_S = 600
"""How long a browser may reuse a preflight's answer."""


def with_cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    """``app`` answering preflights and marking its answers for ``origins`` (none: ``app``)."""
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=METHODS,
        allow_headers=REQUEST_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=MAX_AGE_S,
    )


MAX_ORIGIN_BYTES = 512
"""Of an ``Origin`` header, what the HTTP guard keeps for its refusal (more is no origin)."""


def cors_lines(origin: bytes, allowed: frozenset[str]) -> list[bytes]:
    """The CORS header lines of a refusal the HTTP guard writes itself (400, 408, 431: no app
    answers them) to a page of ``origin``, as ``CORSMiddleware`` writes them on the app's
    answers; none for an origin not allowed, or none sent."""
    if not origin or not allowed:
        return []
    if "*" in allowed:
        lines = [b"access-control-allow-origin: *\r\n"]
    elif origin.decode("latin-1") in allowed:
        lines = [b"access-control-allow-origin: " + origin + b"\r\n", b"vary: Origin\r\n"]
    else:
        return []
    exposed = ", ".join(EXPOSED_HEADERS).encode()
    return [*lines, b"access-control-expose-headers: " + exposed + b"\r\n"]
