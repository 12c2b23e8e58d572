"""The predict protocol's contract with uvicorn, in process: the uvicorn internals it relies on
still exist (this fails on a uvicorn release that changes them), a predict stays marked
disconnected when a pipelined request replaced uvicorn's cycle, and a forced shutdown still
answers the predict it cancels. The data plane here is a stand-in that waits on an event: what
is tested is the connection handling, not predict (tests/test_http_protocol.py covers that
against a real gateway)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.transport.fast_path import PredictFastPath
from gateway.transport.http_protocol import UVICORN_ATTRIBUTES, PredictHttpProtocol

PREDICT = (
    b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


class HeldService:
    """Answers predict only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def predict(self, deployment: str, raw: bytes, request_id: str | None) -> Any:
        self.started.set()
        await self.release.wait()
        return {"deployment": deployment}


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _protocol(
    app: Any, cls: type[HttpToolsProtocol] = PredictHttpProtocol
) -> tuple[HttpToolsProtocol, Transport]:
    config = Config(app=app, http=cls, lifespan="off", log_level="warning")
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_the_uvicorn_internals_the_protocol_uses_still_exist() -> None:
    protocol, _ = _protocol(FastAPI(), HttpToolsProtocol)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the head, unfinished
    missing = [name for name in UVICORN_ATTRIBUTES if not hasattr(protocol, name)]
    assert missing == [], f"uvicorn no longer has {missing}: check gateway.transport.http_protocol"
    for hook in ("on_headers_complete", "on_body", "on_message_complete"):
        assert callable(getattr(HttpToolsProtocol, hook))


@pytest.fixture
def held() -> tuple[PredictFastPath, HeldService]:
    app = FastAPI()
    service = HeldService()
    app.state.service = service
    return PredictFastPath(app, max_body_bytes=1024), service


async def test_a_predict_with_a_request_pipelined_behind_it_learns_that_the_client_left(
    held: tuple[PredictFastPath, HeldService],
) -> None:
    fast, service = held
    protocol, transport = _protocol(fast)
    assert isinstance(protocol, PredictHttpProtocol)
    protocol.data_received(PREDICT + HEALTH)
    await asyncio.wait_for(service.started.wait(), 5)
    (predict,) = protocol.predicts
    assert protocol.cycle is not predict  # uvicorn's cycle is now the pipelined request's
    protocol.connection_lost(None)
    assert predict.disconnected
    service.release.set()
    await asyncio.sleep(0.05)
    assert transport.written == b""


async def test_a_forced_shutdown_still_answers_the_predict_it_cancels(
    held: tuple[PredictFastPath, HeldService],
) -> None:
    fast, service = held
    protocol, transport = _protocol(fast)
    protocol.data_received(PREDICT)
    await asyncio.wait_for(service.started.wait(), 5)
    (task,) = protocol.tasks
    task.cancel()  # what uvicorn does once timeout_graceful_shutdown runs out
    with pytest.raises(asyncio.CancelledError):
        await task
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    assert b"shutting down" in body
