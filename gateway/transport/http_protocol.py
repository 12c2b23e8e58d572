"""uvicorn's HTTP/1.1 protocol, with predict answered straight on the connection.

Behind ASGI, every request costs uvicorn a scope, a request-response cycle with its own event,
message dicts for each send, and two socket writes per response (the head, then the body):
about a fifth of the gateway's CPU per request at concurrency 64. This protocol is uvicorn's
own (httptools) for everything, except that a ``POST /v1/deployments/{deployment}/predict`` on
a connection with nothing else in flight is served by ``PredictFastPath.answer`` directly: the
body gathered in the parser's callbacks, one task, the whole response in one write. Anything
unusual (``Expect: 100-continue``, an upgrade, a percent-encoded path, a request pipelined
behind another) takes uvicorn's ASGI path, which serves predict through the same
``PredictFastPath``, so both ways answer alike.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.problems import RETRY, Problem
from gateway.transport.urls import PREDICT_TARGET

if TYPE_CHECKING:  # imported where the app runs: uvicorn's supervising process stays small
    from gateway.transport.fast_path import PredictFastPath, Reply

UVICORN_ATTRIBUTES = (
    "cycle",
    "parser",
    "url",
    "headers",
    "expect_100_continue",
    "tasks",
    "loop",
    "transport",
    "server_state",
    "on_response_complete",
    "connection_lost",
)
"""What this protocol uses of uvicorn's ``HttpToolsProtocol`` beyond its public options;
``tests/test_http_protocol.py`` fails when a uvicorn release changes any of them (and
pyproject.toml bounds uvicorn to the releases tested)."""

SHUTTING_DOWN = Problem(503, "the gateway is shutting down", headers=RETRY, close=True)

_JSON_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n"


class _NoEvent:
    def set(self) -> None:
        pass


class _PredictCycle:
    """Stands in for uvicorn's request-response cycle while a predict is in flight: uvicorn's
    own code reads ``response_complete``, clears ``keep_alive`` on shutdown, sets
    ``disconnected`` and signals ``message_event`` when the client goes."""

    __slots__ = (
        "chunks",
        "deployment",
        "disconnected",
        "keep_alive",
        "message_event",
        "request_id",
        "response_complete",
        "size",
    )  # fmt: skip

    def __init__(self, deployment: str, request_id: str | None, keep_alive: bool):
        self.deployment = deployment
        self.request_id = request_id
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.message_event = _NoEvent()


class PredictHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fast = _find_fast_path(self.app)
        self.predicts: set[_PredictCycle] = set()
        """Predicts in flight on this connection. uvicorn replaces ``self.cycle`` when a
        request is pipelined behind one, so it cannot be the only reference to them."""

    def connection_lost(self, exc: Exception | None) -> None:
        for cycle in self.predicts:
            cycle.disconnected = True
        super().connection_lost(exc)

    # -- parser callbacks ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        fast = self.fast
        if (
            fast is not None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.expect_100_continue
            and self.parser.get_method() == b"POST"
            and not self.parser.should_upgrade()
        ):
            match = PREDICT_TARGET.match(self.url)
            if match is not None:
                self._start(fast, match.group(1).decode("ascii"))
                return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not _PredictCycle:
            super().on_body(body)
            return
        if cycle.response_complete:
            return
        assert self.fast is not None
        cycle.size += len(body)
        if self.fast.cap.exceeded(cycle.size):
            self._write(cycle, self.fast.cap.too_large().reply())
            return
        cycle.chunks.append(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is not _PredictCycle:
            super().on_message_complete()
            return
        if cycle.response_complete:
            return
        self.predicts.add(cycle)
        task = self.loop.create_task(self._answer(cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # a graceful shutdown waits for it

    # -- the predict request ------------------------------------------------------------------

    def _start(self, fast: PredictFastPath, deployment: str) -> None:
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        request_id, refusal = fast.check_headers(self.headers)
        cycle = _PredictCycle(deployment, request_id, keep_alive)
        self.cycle = cycle  # type: ignore[assignment]
        if refusal is not None:
            self._write(cycle, refusal)

    async def _answer(self, cycle: _PredictCycle) -> None:
        assert self.fast is not None
        raw = cycle.chunks[0] if len(cycle.chunks) == 1 else b"".join(cycle.chunks)
        try:
            answer = await self.fast.answer(cycle.deployment, raw, cycle.request_id)
        except asyncio.CancelledError:
            # A forced shutdown (the graceful period ran out): the caller still gets an answer.
            if not cycle.disconnected and not cycle.response_complete:
                self._write(cycle, SHUTTING_DOWN.reply())
            raise
        finally:
            self.predicts.discard(cycle)
        if cycle.disconnected:
            cycle.response_complete = True  # nobody left to tell
            return
        self._write(cycle, answer)

    def _write(self, cycle: _PredictCycle, answer: Reply) -> None:
        status, body, headers = answer
        close = not cycle.keep_alive or (b"connection", b"close") in headers
        out = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:  # server, date
            out += [name, b": ", value, b"\r\n"]
        out.append(_JSON_HEAD % len(body))
        for name, value in headers:
            out += [name, b": ", value, b"\r\n"]
        if close and (b"connection", b"close") not in headers:
            out.append(b"connection: close\r\n")
        out += [b"\r\n", body]
        self.transport.write(b"".join(out))
        cycle.response_complete = True
        if close:
            cycle.keep_alive = False
            self.transport.close()
        self.on_response_complete()  # keep-alive timer, or the next pipelined request


def _find_fast_path(app: Any) -> PredictFastPath | None:
    """The fast path under uvicorn's wrappers (proxy headers, message logging)."""
    from gateway.transport.fast_path import PredictFastPath

    for _ in range(8):
        if isinstance(app, PredictFastPath):
            return app
        app = getattr(app, "app", None)
    return None


__all__ = ["PredictHttpProtocol"]
