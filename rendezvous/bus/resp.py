"""Lean Redis connections for the hot path's few commands.

redis-py cost the gateway about a fifth of its CPU per request (its command layer, a Python
stream reader, a timeout context around every reply) and the model workers more than their
model. The hot path sends few commands: the gateway its envelope XADDs (pipelined with their
neighbours') and the reply stream's XREAD, a worker its XREADGROUP and its results and acks.
Those go over these connections instead: RESP2, a batch of commands packed and written at
once, the replies parsed by hiredis in C and handed back together; ``LeanRedis`` on an
``asyncio.Protocol`` for the gateway, ``BlockingLeanRedis`` on a socket for the workers.
Everything else stays on redis-py.

Failures raise redis-py's exception classes, so callers handle both clients alike. Error replies
come back in the reply list as exception objects, like a pipeline's ``raise_on_error=False``.
"""

from __future__ import annotations

import asyncio
import socket
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
        self._reader = _new_reader()
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
            batch.replies.append(_loading(reply))
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


@dataclass(frozen=True)
class Endpoint:
    """Where Redis is and how to open a session with it, from a URL or a redis-py client."""

    host: str
    port: int
    path: str | None
    """A unix socket, instead of host and port."""
    tls: ssl.SSLContext | None
    handshake: tuple[bytes, ...]
    """AUTH and SELECT, sent first on every new connection."""

    @property
    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        return cls.from_options(parse_url(url))

    @classmethod
    def of_client(cls, client: redis.Redis) -> Endpoint:
        """The address and credentials a redis-py client connects with."""
        pool = client.connection_pool
        return cls.from_options(
            {**pool.connection_kwargs, "connection_class": pool.connection_class}
        )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Endpoint:
        handshake = []
        if options.get("password") is not None:
            user = options.get("username")
            password = str(options["password"]).encode()
            handshake.append(pack(b"AUTH", str(user).encode(), password) if user else
                             pack(b"AUTH", password))  # fmt: skip
        if options.get("db"):
            handshake.append(pack(b"SELECT", b"%d" % int(options["db"])))
        tls = "SSL" in getattr(options.get("connection_class"), "__name__", "")
        return cls(
            host=options.get("host") or "localhost",
            port=int(options.get("port") or 6379),
            path=options.get("path"),
            tls=_ssl_context(options) if tls else None,
            handshake=tuple(handshake),
        )

    def check_handshake(self, replies: list[Any]) -> None:
        for reply in replies:
            if isinstance(reply, Exception):
                if "WRONGPASS" in str(reply) or "AUTH" in str(reply):
                    raise redis.AuthenticationError(str(reply))
                raise reply


class LeanRedis:
    """One lazily (re)connected Redis connection that sends packed command batches."""

    def __init__(
        self, url: str | Endpoint, *, timeout_s: float | None, connect_timeout_s: float = 2.0
    ):
        self.endpoint = Endpoint.from_url(url) if isinstance(url, str) else url
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._where = self.endpoint.where
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
        end = self.endpoint
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if end.path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(loop), end.path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(loop), end.host, end.port, ssl=end.tls
                    )
                replies = (
                    await protocol.send(b"".join(end.handshake), len(end.handshake))
                    if end.handshake
                    else []
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis at {self._where}: {exc}") from exc
        try:
            end.check_handshake(replies)
        except Exception:
            protocol.abort("handshake refused")
            raise
        return protocol


class BlockingLeanRedis:
    """The same for a synchronous process (model workers): one socket, packed batches in,
    their replies out. Not thread-safe, like the worker loop that owns it."""

    def __init__(
        self, endpoint: Endpoint, *, timeout_s: float | None, connect_timeout_s: float = 2.0
    ):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._reader = _new_reader()

    def execute(
        self, blob: bytes, replies: int, *, retry: bool = True, timeout_s: float | None = None
    ) -> list[Any]:
        """As ``LeanRedis.execute``; ``timeout_s`` None means the connection's own."""
        try:
            return self._round_trip(blob, replies, timeout_s)
        except redis.ConnectionError:
            if not retry:
                raise
            return self._round_trip(blob, replies, timeout_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __del__(self) -> None:  # like redis-py's connections: a dropped client closes its socket
        self.close()

    def _round_trip(self, blob: bytes, replies: int, timeout_s: float | None) -> list[Any]:
        sock = self._sock or self._open()
        sock.settimeout(self.timeout_s if timeout_s is None else timeout_s)
        try:
            sock.sendall(blob)
            return self._read(sock, replies)
        except TimeoutError:
            self.close()  # a late reply would be taken for the next batch's
            raise redis.TimeoutError(f"Redis at {self.endpoint.where} did not answer") from None
        except OSError as exc:
            self.close()
            raise redis.ConnectionError(f"connection to Redis lost: {exc}") from exc

    def _read(self, sock: socket.socket, replies: int) -> list[Any]:
        out: list[Any] = []
        reader = self._reader
        while len(out) < replies:
            try:
                reply = reader.gets()
            except redis.InvalidResponse as exc:
                raise ConnectionResetError(f"Redis sent a malformed reply: {exc}") from exc
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed by server")
                reader.feed(data)
                continue
            out.append(_loading(reply))
        return out

    def _open(self) -> socket.socket:
        end = self.endpoint
        try:
            if end.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout_s)
                sock.connect(end.path)
            else:
                sock = socket.create_connection((end.host, end.port), self.connect_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if end.tls is not None:
                    sock = end.tls.wrap_socket(sock, server_hostname=end.host)
            self._reader = _new_reader()
            if end.handshake:
                sock.sendall(b"".join(end.handshake))
                handshake = self._read(sock, len(end.handshake))
        except OSError as exc:
            raise redis.ConnectionError(f"cannot connect to Redis at {end.where}: {exc}") from exc
        if end.handshake:
            try:
                end.check_handshake(handshake)
            except Exception:
                sock.close()
                raise
        self._sock = sock
        return sock


def _new_reader() -> hiredis.Reader:
    return hiredis.Reader(protocolError=redis.InvalidResponse, replyError=redis.ResponseError)


def _loading(reply: Any) -> Any:
    """A server still loading its data is a passing state, not an error in the command."""
    if isinstance(reply, redis.ResponseError) and str(reply).startswith("LOADING"):
        return redis.BusyLoadingError(str(reply))
    return reply


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
