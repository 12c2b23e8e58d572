"""A lean asyncio Redis connection for the gateway's two hot commands.

redis-py cost the gateway about a fifth of its CPU per request: its command layer, a Python
stream reader, a timeout context around every reply. Only two commands sit on the request
path: the envelope's XADD (pipelined with its neighbours') and the reply stream's XREAD. They go
over this instead: RESP2 on an ``asyncio.Protocol``, a batch of commands written at once, the
replies parsed by hiredis in C and handed back together. Everything else stays on redis-py.

Failures raise redis-py's exception classes, so callers handle both clients alike. Error replies
come back in the reply list as exception objects, like a pipeline's ``raise_on_error=False``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
import redis
from redis.connection import parse_url

_SSL_OPTIONS = {
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
}


def pack(*args: bytes) -> bytes:
    """One command in RESP; every argument already bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


@dataclass(slots=True)
class _Batch:
    expected: int
    future: asyncio.Future[list[Any]]
    replies: list[Any] = field(default_factory=list)


class _Protocol(asyncio.Protocol):
    """One connection: replies are matched to batches in the order the batches were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._reader = hiredis.Reader(
            protocolError=redis.InvalidResponse, replyError=redis.ResponseError
        )
        self._waiting: deque[_Batch] = deque()
        self._transport: asyncio.Transport | None = None
        self.lost: redis.ConnectionError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, blob: bytes, replies: int) -> asyncio.Future[list[Any]]:
        if self.lost is not None:
            raise self.lost
        assert self._transport is not None
        batch = _Batch(replies, self._loop.create_future())
        self._waiting.append(batch)
        self._transport.write(blob)
        return batch.future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except redis.InvalidResponse as exc:
                self._close(redis.ConnectionError(f"Redis sent a malformed reply: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self._close(redis.ConnectionError("Redis sent a reply nobody asked for"))
                return
            batch = self._waiting[0]
            if isinstance(reply, redis.ResponseError) and str(reply).startswith("LOADING"):
                reply = redis.BusyLoadingError(str(reply))
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                self._waiting.popleft()
                if not batch.future.done():  # its caller may have given up
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.ConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def abort(self, reason: str) -> None:
        """Drop the connection: used when the order of replies can no longer be trusted."""
        self._close(redis.ConnectionError(reason))

    def _close(self, error: redis.ConnectionError) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: redis.ConnectionError) -> None:
        if self.lost is None:
            self.lost = error
        while self._waiting:
            batch = self._waiting.popleft()
            if not batch.future.done():
                batch.future.set_exception(self.lost)


class LeanRedis:
    """One lazily (re)connected Redis connection that sends packed command batches."""

    def __init__(self, url: str, *, timeout_s: float | None, connect_timeout_s: float = 2.0):
        options = parse_url(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port: int = int(options.get("port", 6379))
        self._ssl = _ssl_context(options) if "SSL" in str(options.get("connection_class")) else None
        self._where = self._path or f"{self._host}:{self._port}"
        handshake = []
        if options.get("password") is not None:
            user = options.get("username")
            password = str(options["password"]).encode()
            handshake.append(pack(b"AUTH", str(user).encode(), password) if user else
                             pack(b"AUTH", password))  # fmt: skip
        if options.get("db"):
            handshake.append(pack(b"SELECT", b"%d" % int(options["db"])))
        self._handshake = handshake
        self._protocol: _Protocol | None = None
        self._closed = False
        self._lock = asyncio.Lock()

    async def execute(
        self, blob: bytes, replies: int, *, retry: bool = True, timeout_s: float | None = None
    ) -> list[Any]:
        """Send ``replies`` commands packed in ``blob`` and return their replies in order.

        ``retry``: once more on a fresh connection if the connection failed (a connection that
        died quietly fails its first use; a command may then run twice: callers are
        at-least-once). ``timeout_s`` overrides the connection's timeout for this batch."""
        try:
            return await self._round_trip(blob, replies, timeout_s)
        except redis.ConnectionError:
            if not retry:
                raise
            return await self._round_trip(blob, replies, timeout_s)

    async def connect(self) -> None:
        await self._connection()

    async def close(self) -> None:
        """Close for good; a batch waiting fails with ``redis.ConnectionError``, as does any
        later one (a retry must not reopen what was closed to end a blocking read)."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.abort("connection closed by the gateway")
            self._protocol = None

    async def _round_trip(self, blob: bytes, replies: int, timeout_s: float | None) -> list[Any]:
        protocol = await self._connection()
        future = protocol.send(blob, replies)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if timeout_s is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            protocol.abort("timed out")  # a late reply would be taken for the next batch's
            raise redis.TimeoutError(
                f"Redis at {self._where} did not answer in {timeout_s}s"
            ) from None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        async with self._lock:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None:
                return protocol
            if self._closed:
                raise redis.ConnectionError("this connection was closed by the gateway")
            self._protocol = await self._open()
            return self._protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(loop), self._path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(loop), self._host, self._port, ssl=self._ssl
                    )
                replies = (
                    await protocol.send(b"".join(self._handshake), len(self._handshake))
                    if self._handshake
                    else []
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis at {self._where}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):
                protocol.abort("handshake refused")
                if "WRONGPASS" in str(reply) or "AUTH" in str(reply):
                    raise redis.AuthenticationError(str(reply))
                raise reply
        return protocol


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    unknown = sorted(k for k in options if k.startswith("ssl_") and k not in _SSL_OPTIONS)
    if unknown:
        raise ValueError(f"RDV_REDIS_URL: TLS options {unknown} are not supported by the gateway")
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    requirement = str(options.get("ssl_cert_reqs", "required")).lower()
    if requirement == "none" or options.get("ssl_check_hostname") in (False, "false", "False"):
        context.check_hostname = False
    if requirement == "none":
        context.verify_mode = ssl.CERT_NONE
    elif requirement == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
