"""``GET /dashboard/{deployment}``: the drift report as charts for a person to look at.

The route only serves a self-contained page (``gateway.observability.dashboard_page``); the
page itself reads
``/v1/deployments/{deployment}/drift``, so an unknown deployment shows that endpoint's error
and the dashboard needs no Redis access of its own.
"""

from __future__ import annotations

import html
import json
import secrets

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse

from gateway.observability.dashboard_page import PAGE
from rendezvous import names


def content_security_policy(nonce: str) -> str:
    """Only this response's own inline script and style may run, and the page may talk to its
    own origin alone: no CDN or font can sneak in, and injected markup could not execute."""
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def render_dashboard(deployment: str, nonce: str) -> str:
    """The page for ``deployment``. The name is validated by the route but still escaped: as
    HTML text in the title, and as a JSON string in the script with ``<``, ``>`` and ``&``
    spelled as ``\\u`` escapes, so no ``</script>`` can end the script element early."""
    as_js = (
        json.dumps(deployment)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return (
        PAGE.replace("__NONCE__", nonce)
        .replace("__TITLE__", html.escape(deployment))
        .replace("__DEPLOYMENT__", as_js)
    )


def dashboard_router() -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard/{deployment}", response_class=HTMLResponse)
    async def dashboard(deployment: str) -> HTMLResponse:
        """Divergence and drift over time, score distributions (real, canary, reference), the
        top drifting features, active alerts and the latest events; redrawn every 5 s from
        ``/v1/deployments/{deployment}/drift``."""
        try:
            names.check_name(deployment, "deployment")
        except names.InvalidName as exc:
            raise HTTPException(422, str(exc)) from None
        nonce = secrets.token_urlsafe(18)
        return HTMLResponse(
            render_dashboard(deployment, nonce),
            headers={
                "Content-Security-Policy": content_security_policy(nonce),
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return router
