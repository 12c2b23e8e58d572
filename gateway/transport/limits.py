"""The request body cap: one rule (``BodyCap``) that every way in applies, and the ASGI
middleware that applies it to the framework's routes. A body is refused with 413 before a byte
more than the cap is read, whether the client declared a Content-Length or streamed chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.problems import Problem, Style, bad_length, too_large


class BodyCap:
    """At most ``limit`` bytes of body."""

    __slots__ = ("limit",)

    def __init__(self, limit: int):
        self.limit = limit

    def refuse_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> Problem | None:
        """The refusal the headers already call for: a malformed or too large Content-Length."""
        for name, value in headers:
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return bad_length()
                if declared < 0:
                    return bad_length()
                if declared > self.limit:
                    return self.too_large()
        return None

    def exceeded(self, size: int) -> bool:
        return size > self.limit

    def too_large(self) -> Problem:
        return too_large(self.limit)


class BodySizeLimit:
    """``BodyCap`` around an ASGI app, with caps of their own for exact paths (a model upload
    is larger than a prediction). ``on_refused`` hears of each request it refuses (its scope),
    so that a refused predict is counted wherever it came in."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        path_limits: Mapping[str, int] | None = None,
        on_refused: Callable[[Scope], None] | None = None,
    ):
        self.app = app
        self.cap = BodyCap(max_body_bytes)
        self.path_caps = {path: BodyCap(limit) for path, limit in (path_limits or {}).items()}
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        cap = self.path_caps.get(path, self.cap)
        style = style_of(path)
        refusal = cap.refuse_headers(scope.get("headers", ()))
        if refusal is not None:
            self._refused(scope)
            await send_problem(send, refusal, style)
            return
        seen = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if cap.exceeded(seen):
                    # Answer now and tell the app the client left; whatever the app answers
                    # after that is dropped.
                    refused = True
                    self._refused(scope)
                    await send_problem(send, cap.too_large(), style)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _refused(self, scope: Scope) -> None:
        if self.on_refused is not None:
            self.on_refused(scope)


Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]
"""(status, JSON body, headers besides content-type and content-length)."""


async def send_reply(send: Send, reply: Reply) -> None:
    """A JSON answer as an ASGI response."""
    status, body, extra = reply
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


def style_of(path: str) -> Style:
    """The Open Inference Protocol's routes (``/v2``) answer ``{"error"}``, the rest
    ``{"detail"}``."""
    return Style.ERROR if path == "/v2" or path.startswith("/v2/") else Style.DETAIL


async def send_problem(send: Send, problem: Problem, style: Style = Style.DETAIL) -> None:
    await send_reply(send, problem.reply(style))
