"""Bounds on what one HTTP client can make the gateway hold: the size and number of a request's
header fields (431) and the time its head and its body may take (408). A request that does not
parse is refused here too (400 naming the fault).

uvicorn's httptools protocol has none of these: a 200 MB header was accepted, slow clients
were held forever, a body shorter than its Content-Length waited forever. The guard reads each
connection's bytes with a parser of its own (httptools' public API) just before uvicorn's
protocol does (``gateway.transport.guarded_protocol`` puts it there), and answers and closes
the connection when a bound is crossed: at once, or after the answers still owed to requests
pipelined before the refused one.

Deadlines are checked by one sweep a second per process, not by a timer per request: a request
costs the guard a second parse of its head (a few microseconds) and two clock reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools

from gateway.problems import Problem
from gateway.transport.cors import MAX_ORIGIN_BYTES, cors_lines
from gateway.transport.http_parsing import end_of_requests, fault_of, method_of
from gateway.transport.limits import style_of
from rendezvous.retry_log import OncePerSpell

log = logging.getLogger(__name__)
REFUSALS_LOGGED = OncePerSpell(repeat_s=60.0, burst=20)
"""A refusal's line at most 20 times a minute, then how many more: a client looping on an
18-byte bad request wrote 9 bytes of log for each byte it sent (a helper's probe); every
refusal is counted in ``rdv_http_refused_total`` all the same."""
log.addFilter(REFUSALS_LOGGED)

SWEEP_S = 1.0
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024
"""After a refusal the connection is half-closed and what the client still sends is read and
dropped, for this long and up to this much: closing at once with unread bytes would reset the
connection, and the client could lose the answer."""
FRAMING_PER_CHUNK = 32
"""Bytes a chunk's framing takes beyond its data: its size line (16 hex digits at most) and two
line ends, with room to spare. A body's chunk extensions may add ``max_header_bytes`` in all:
they reach neither the app nor its body cap, so a client streamed gigabytes of one chunk's
extension for the whole body timeout (2.6 GB in 8 s, found by a helper's fuzzing)."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int
    """Request line and header fields of one request, in bytes (431 beyond)."""
    max_headers: int
    """Header fields of one request (431 beyond)."""
    header_timeout_s: float
    """From a request's first byte (or a connection's opening) to the end of its head (408)."""
    body_timeout_s: float
    """From the end of a request's head to the end of its body (408)."""
    keep_alive_s: float
    """From an answer to the next request's first byte (a silent close beyond)."""
    requests_per_connection: int = 0
    """A keep-alive connection's answers before the last one closes it (0: no bound)."""
    cors_origins: frozenset[str] = frozenset()
    """``RDV_CORS_ORIGINS``: a refusal to a page of one of them says so, as the app's answers
    do (else the page's script reads a network error, not the status and its reason)."""


class Refusals:
    """The guard's refusals in this process, by status (``rdv_http_refused_total``), and whom
    to tell of each (the metrics, which then write them out within their flush interval)."""

    def __init__(self) -> None:
        self.by_status: Counter[int] = Counter()
        self.listener: Callable[[], None] | None = None

    def add(self, status: int) -> None:
        self.by_status[status] += 1
        if self.listener is not None:
            self.listener()


REFUSALS = Refusals()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the guard answers instead."""


def _never_busy() -> bool:
    return False


class ConnectionGuard:
    """The bounds of one connection; its methods are also the parser's callbacks."""

    __slots__ = (
        "__weakref__",
        "busy",
        "chunks",
        "closed",
        "deadline",
        "drained",
        "finished",
        "framing",
        "head_bytes",
        "headers",
        "held",
        "hosts",
        "in_body",
        "in_head",
        "limits",
        "origin",
        "parser",
        "raw_head",
        "refusal",
        "seen",
        "target",
        "transport",
        "with_body",
        "write_stuck_since",
    )  # fmt: skip

    def __init__(
        self,
        transport: asyncio.Transport,
        limits: HttpLimits,
        busy: Callable[[], bool] = _never_busy,
    ):
        self.transport = transport
        self.limits = limits
        self.busy = busy
        """Whether the app is still answering a request of this connection (the protocol's
        to say): an idle connection is closed only when it is not."""
        self.with_body = False
        """The request's head declares a body (Content-Length above 0, Transfer-Encoding)."""
        self.hosts = 0
        """Host fields in the request's head: one, as HTTP/1.1 asks (none in HTTP/1.0)."""
        self.write_stuck_since = 0.0
        """When the transport last asked us to stop writing (0: it did not): a client that
        does not read holds its answers in our memory."""
        self.parser: Any = httptools.HttpRequestParser(self)
        self.in_head = False
        self.in_body = False
        self.seen = False
        self.finished = 0
        """Requests read in full (a refusal must not overtake an answer still owed)."""
        self.head_bytes = 0
        self.raw_head = 0
        self.headers = 0
        self.framing = 0
        """Bytes of the current body's reads that were not its data: chunk framing."""
        self.chunks = 0
        self.refusal: Problem | None = None
        self.held: Problem | None = None
        """A refusal waiting for the answers owed to requests before it (pipelined)."""
        self.target = b""
        """The request target's first bytes: a ``/v2`` route's refusal is in its shape."""
        self.origin = b""
        """The request's ``Origin`` header, where it came before a refusal."""
        self.closed = False
        self.drained = 0
        """Bytes read and dropped after a refusal (bounded by ``LINGER_BYTES``)."""
        self.deadline = time.monotonic() + limits.header_timeout_s
        """When the current phase (waiting for a first request, a head, a body, the next
        request after an answer) must end; 0: no deadline."""

    # -- fed by the protocol ------------------------------------------------------------------

    def admit(self, data: bytes) -> bytes:
        """What of ``data`` uvicorn is to read: all of it, or, when it crossed a bound, only the
        whole requests before the refused one (often nothing); the refusal is written after
        their answers."""
        if self.closed:
            self.drained += len(data)  # lingering after a refusal: dropped, counted
            if self.drained > LINGER_BYTES:
                self.deadline = 0.0
                self.transport.close()
            return b""
        if self.parser is None:  # released
            return data
        opening = b"" if self.seen else data
        self.seen = True
        began_here = not self.in_head
        between = began_here and not self.in_body
        body_before = self.in_body
        finished = self.finished
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # uvicorn (ws="none": no protocol is handed over, a websocket's neither) ignores
            # the Upgrade and goes on reading plain HTTP, as the parser does from the next
            # read: guarded still (standing down let one connection send 100 MB header fields).
            if method_of(self.parser) == b"CONNECT":
                # uvicorn cannot read CONNECT's target: it answered a plain-text 400
                self.refusal = Problem(400, "CONNECT is not served: the gateway is not a proxy")
            elif self.with_body:
                # The parser ends an Upgrade's message at its head: the app read an empty body
                # (curl --http2 on http:// sends one with each POST) and the body's bytes
                # were read as the next request.
                self.refusal = Problem(400, UPGRADE_WITH_BODY)
            else:
                return data
            return self._refuse_in_turn(data, self.finished - finished - 1, between)
        except httptools.HttpParserError as exc:
            if self.refusal is None:  # malformed (uvicorn answered a plain-text 400 at once,
                # overtaking the answers owed to requests before it, which were lost)
                fault = fault_of(self.parser, exc, opening)
                self.refusal = Problem(400, f"malformed HTTP request: {fault}")
            # in a body whose head uvicorn read: the app is at it, and waits on nothing before it
            apps = body_before and self.in_body and self.finished == finished
            return self._refuse_in_turn(data, self.finished - finished, between, apps)
        if body_before and self.in_body and self.finished == finished:  # within one body
            # what of the read was not the body's data is its chunks' framing: bounded
            self.framing += len(data)
            if self.framing > self.limits.max_header_bytes + FRAMING_PER_CHUNK * self.chunks:
                self.refusal = Problem(400, "malformed HTTP request: chunk framing beyond "
                                       f"{self.limits.max_header_bytes} bytes (chunk extensions "
                                       "are not taken)")  # fmt: skip
                return self._refuse_in_turn(data, 0, False, apps=True)
        elif self.in_body:  # a body began in this read: its data here owes no framing
            self.framing = 0
        if self.in_head and not began_here:
            # The head is still arriving across reads: a header field still being read sits in
            # the parser's buffer, so count the bytes as they come. (The read a head began in is
            # not counted this way, as part of it may be the previous request's body; what the
            # parser holds is bounded all the same: one read plus the cap.)
            self.raw_head += len(data)
            if self.raw_head > self.limits.max_header_bytes:
                self.refusal = _too_large(self.limits)
                return self._refuse_in_turn(data, 0, between)
        return data

    def expired(self, now: float) -> None:
        if self.write_stuck_since and now - self.write_stuck_since > self.limits.body_timeout_s:
            # The client reads nothing of what it asked for: let it go, and the answers with it.
            self.closed = True
            self.deadline = 0.0
            self.transport.abort()
            return
        if not self.deadline or now < self.deadline:
            return
        if self.closed:  # the linger after a refusal is over
            self.deadline = 0.0
            self.transport.close()
            return
        if self.in_head or self.in_body:
            phase = "head" if self.in_head else "body"
            limit = self.limits.header_timeout_s if self.in_head else self.limits.body_timeout_s
            problem = Problem(408, f"the request's {phase} took longer than {limit:g} s")
            if self.in_head and self.busy():  # a request before it is still being answered
                self._hold(problem)
            else:
                self.answer(problem)
        elif self.busy():  # between requests, one still being answered: wait for it
            self.deadline = now + self.limits.header_timeout_s
        else:
            # Opened and never used, or idle after its last answer without beginning another
            # request (bytes that begin none, like a bare CRLF, or a body sent after an early
            # answer, stop uvicorn's keep-alive timer for good): nothing to answer.
            self.closed = True
            self.deadline = 0.0
            self.transport.close()

    def answer(self, problem: Problem) -> None:
        """Write the refusal and close. Each is counted and logged as a warning with the client
        and the reason, as uvicorn logged its own 400 ("Invalid HTTP request received."): a
        client that speaks TLS or HTTP/2 to this port, sends oversized heads or stalls shows
        in the log."""
        self.closed = True
        REFUSALS.add(problem.status)
        peer = self.transport.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        log.warning("refused a request from %s: %d %s", client, problem.status, problem.detail)
        path = self.target.decode("latin-1").partition("?")[0]
        status, body, headers = problem.reply(style_of(path))
        head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head += [name + b": " + value + b"\r\n" for name, value in headers if name != b"connection"]
        head += cors_lines(self.origin, self.limits.cors_origins)
        head.append(b"connection: close\r\n\r\n")
        transport = self.transport
        transport.write(b"".join(head) + body)
        if transport.can_write_eof():
            transport.write_eof()
            self.deadline = time.monotonic() + LINGER_S
        else:
            transport.close()

    def answered(self) -> None:
        """An answer is written in full: the connection may now idle for the keep-alive time
        (not for what is left of a deadline that ran while the answer was made: after a long
        answer that was next to nothing, and the client's next request met a closed
        connection). A refusal held for the answers before it goes after the last of them."""
        held = self.held
        if held is not None:
            if not self.busy():
                self.held = None
                if not self.transport.is_closing():  # that answer closed the connection
                    self.answer(held)
            return
        if not (self.closed or self.in_head or self.in_body):
            self.deadline = time.monotonic() + self.limits.keep_alive_s

    def release(self) -> None:
        """The connection is gone: nothing more to check or answer. Drops the parser and the
        ``busy`` callback, which point back at this guard and at the protocol: without those
        cycles a closed connection is freed at once, not at the collector's rare full pass,
        which under a churn of connections left ~10 KB each behind for minutes."""
        self.closed = True
        self.deadline = 0.0
        self.write_stuck_since = 0.0
        self.parser = None
        self.busy = _never_busy

    def _refuse_in_turn(self, data: bytes, owed: int, between: bool, apps: bool = False) -> bytes:
        """Refuse after the answers owed to the requests before the refused one: ``owed`` of
        them complete in ``data`` (pipelined), and any the app is still answering (unless
        ``apps``: the app holds the refused request itself). A refusal written at once
        overtook them: the client read it as the first one's answer, and the others got none.
        Where they end in ``data`` is found again by parsing (a rare path) when ``data`` began
        between requests; else (a request begun in an earlier read completes in this one,
        rarer still) they are lost, as before."""
        assert self.refusal is not None
        passed = data[: end_of_requests(data, owed)] if owed and between else b""
        if passed or (not apps and self.busy()):
            self._hold(self.refusal)
            return passed
        self.answer(self.refusal)
        return b""

    def _hold(self, problem: Problem) -> None:
        """Read no more of the connection (what comes is dropped, as after a refusal) and
        write ``problem`` once the app has answered what it holds (``answered``)."""
        self.held = problem
        self.closed = True
        self.deadline = 0.0

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.with_body = False
        self.hosts = 0
        self.head_bytes = self.raw_head = self.headers = 0
        self.target = self.origin = b""
        self.deadline = time.monotonic() + self.limits.header_timeout_s

    def on_url(self, url: bytes) -> None:
        if len(self.target) < 5:  # enough for style_of: "/v2", "/v2?", "/v2/"
            self.target += url[: 5 - len(self.target)]
        self.head_bytes += len(url)
        if self.head_bytes > self.limits.max_header_bytes:
            self._refuse(_too_large(self.limits))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 14 and name.lower() == b"content-length":
            self.with_body = self.with_body or value.strip(b" \t0") != b""
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self.with_body = True
        elif len(name) == 6 and name.lower() == b"origin":
            self.origin = value[:MAX_ORIGIN_BYTES].strip()
        elif len(name) == 4 and name.lower() == b"host":
            self.hosts += 1
        self.headers += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.headers > self.limits.max_headers:
            self._refuse(Problem(431, f"more than {self.limits.max_headers} header fields"))
        if self.head_bytes > self.limits.max_header_bytes:
            self._refuse(_too_large(self.limits))

    def on_headers_complete(self) -> None:
        if self.hosts != 1 and (self.hosts or self.parser.get_http_version() != "1.0"):
            # RFC 9112, 3.2: a server must refuse it (uvicorn served it, whatever it named)
            self._refuse(Problem(400, "malformed HTTP request: an HTTP/1.1 request carries one "
                                 f"Host header field, this one {self.hosts}"))  # fmt: skip
        self.in_head = False
        self.in_body = True
        self.deadline = time.monotonic() + self.limits.body_timeout_s
        self.framing = self.chunks = 0

    def on_body(self, body: bytes) -> None:
        self.framing -= len(body)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        self.in_body = False
        self.finished += 1
        # Checked again while the app answers (``expired`` waits for it); ``answered`` then
        # gives the connection its keep-alive time.
        self.deadline = time.monotonic() + self.limits.header_timeout_s

    def _refuse(self, problem: Problem) -> None:
        self.refusal = problem
        raise _Refused


UPGRADE_WITH_BODY = (
    "a request with a body may not ask to switch protocols (Upgrade, Connection: Upgrade): the "
    "gateway speaks HTTP/1.1 alone and cannot read such a body; send it without them (curl: "
    "--http1.1)"
)


def _too_large(limits: HttpLimits) -> Problem:
    return Problem(431, f"request head larger than {limits.max_header_bytes} bytes")


class Sweeper:
    """Checks every guarded connection's deadline once a second, in each event loop."""

    def __init__(self) -> None:
        self.guards: weakref.WeakSet[ConnectionGuard] = weakref.WeakSet()
        self.task: asyncio.Task[None] | None = None

    def add(self, guard: ConnectionGuard) -> None:
        self.guards.add(guard)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.guards:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for guard in list(self.guards):
                guard.expired(now)
