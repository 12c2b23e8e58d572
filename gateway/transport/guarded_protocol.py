"""uvicorn's httptools protocol with the HTTP guard (``gateway.transport.http_guard``) on
every connection, one write per response (``CoalescingTransport``), the keep-alive measured from
each answer, and a bound on the requests a connection serves where several processes share a
port.

uvicorn's protocol is used only through the asyncio ``Protocol`` methods every protocol has,
and the hooks its request cycle calls (``on_headers_complete``, ``on_response_complete``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings
from gateway.transport.coalesce import CoalescingTransport
from gateway.transport.http_guard import ConnectionGuard, HttpLimits, Sweeper

SHARED_PORT_REQUESTS_PER_CONNECTION = 100
"""``RDV_REQUESTS_PER_CONNECTION`` where several gateway processes accept on one port: a
client with eight connections at 100 rows a request reconnects each about once a second, at
a few hundred microseconds of CPU a reconnect on loopback (under 1 % of the requests' own)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``limits`` applied to every connection, writing
    through a ``CoalescingTransport`` (one write per response). A class at
    module level, so that uvicorn can hand it to the worker processes it spawns; each process
    reads the limits from its own settings (the environment) on its first connection."""

    limits: ClassVar[HttpLimits | None] = None
    sweeper: ClassVar[Sweeper | None] = None
    _guard: ConnectionGuard | None = None
    _served = 0
    _last: Any = None
    """The request whose answer is to close the connection (``requests_per_connection``)."""

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
        """A subclass with these limits instead of the settings' (for one process)."""
        return type(cls.__name__, (cls,), {"limits": limits, "sweeper": None})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cls = type(self)
        if cls.limits is None:
            cls.limits = limits_from(Settings())
        if cls.sweeper is None:
            cls.sweeper = Sweeper()
        transport = CoalescingTransport(transport, asyncio.get_running_loop())
        self._guard = ConnectionGuard(transport, cls.limits, self._answering)
        cls.sweeper.add(self._guard)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._guard is not None:
            data = self._guard.admit(data)
        if data:
            super().data_received(data)

    def _unsupported_upgrade_warning(self) -> None:
        """Nothing to warn of: the gateway serves no WebSocket (uvicorn's ``ws="none"``) nor
        h2c, so an Upgrade is ignored and the request answered as HTTP/1.1 (RFC 9110, 7.8).
        uvicorn's two warnings a request, the second advising to install a WebSocket
        library, were any client's to write into the log."""

    def on_headers_complete(self) -> None:
        """Past ``requests_per_connection`` requests, the answer closes the connection, as
        one with ``Connection: close`` would (uvicorn's request cycle's ``keep_alive``, which
        its own graceful shutdown sets too), so that where several processes accept on one
        port the client's next connection goes to whichever takes it first, most often the
        less busy. A request pipelined behind that one keeps the connection open if the
        answer has not started; the last of them closes it instead."""
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle is previous:  # an upgrade, not a request
            return
        self._served += 1
        last = self._last
        if last is not None and not last.response_started:
            last.keep_alive = True
            self._last = None
        limits = type(self).limits
        bound = limits.requests_per_connection if limits is not None else 0
        if bound and self._served >= bound and self._last is None and cycle.keep_alive:
            cycle.keep_alive = False
            self._last = cycle

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._guard is not None:
            self._guard.answered()

    def _answering(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def pause_writing(self) -> None:
        if self._guard is not None:
            self._guard.write_stuck_since = time.monotonic()
        super().pause_writing()

    def resume_writing(self) -> None:
        if self._guard is not None:
            self._guard.write_stuck_since = 0.0
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.release()
        self._last = None
        super().connection_lost(exc)


def limits_from(settings: Settings) -> HttpLimits:
    return HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        keep_alive_s=settings.keep_alive_s,
        requests_per_connection=settings.requests_per_connection or 0,
        cors_origins=frozenset(settings.cors_origins),
    )
