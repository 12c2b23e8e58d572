"""HEAD on every route that answers GET: the GET's status and headers without its body.

FastAPI routes a GET route for GET alone (Starlette's own routes take HEAD too), so every
route answered a HEAD with 405 unless it listed HEAD itself: uptime monitors and load
balancers that probe with HEAD, and ``curl -I``, got 405 from ``/metrics``, the dashboards and
the admin reads. One rule here instead of a decorator a route.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Runs a HEAD request as GET and drops the body of its answer (the length it declares
    stays, as HTTP says a HEAD's should)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def bodiless(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, bodiless)
