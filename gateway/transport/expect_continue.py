"""A request that waits for ``100 Continue`` and is answered without its body asked for: the
answer closes the connection.

uvicorn sends the ``100 Continue`` when the app first asks for the body. A refusal decided
from the head (a 401, 404, 405, 415, 422 on a request id sent twice, a 429) never asks, so
the client may never send its body; the connection then read the client's next request as
the refused one's body, held it for ``RDV_BODY_TIMEOUT_S`` and answered it 408 (found by a
helper's probe). Closing leaves nothing unread to reset: the body was never sent.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CloseUnreadContinue:
    """Adds ``Connection: close`` to the answer of a ``100-continue`` request whose body was
    never asked for; every other request passes untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _expects_continue(scope["headers"]):
            await self.app(scope, receive, send)
            return
        asked = False

        async def receiving() -> Message:
            nonlocal asked
            asked = True
            return await receive()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not asked:
                headers = list(message.get("headers", []))  # a 413 closes already
                if not any(n == b"connection" and b"close" in v.lower() for n, v in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receiving, sending)


def _expects_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


__all__ = ["CloseUnreadContinue"]
