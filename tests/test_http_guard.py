"""The HTTP guard's bounds on one connection, fed bytes directly (tests/test_http_protocol.py
checks the same against a real gateway over sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from gateway.transport.http_guard import (
    LINGER_BYTES,
    REFUSALS,
    REFUSALS_LOGGED,
    ConnectionGuard,
    HttpLimits,
)

LIMITS = HttpLimits(
    max_header_bytes=2048, max_headers=20, header_timeout_s=5, body_timeout_s=5, keep_alive_s=30
)
HEAD = b"POST /v1/deployments/d/predict HTTP/1.1\r\nHost: t\r\n"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = b""
        self.eof = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += bytes(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.aborted = self.closed = True


@pytest.fixture(autouse=True)
def refusal_lines_unsaid() -> None:
    """Each test reads its own refusal's line: none held back by the guard's log budget."""
    REFUSALS_LOGGED.reset()


def guard() -> tuple[ConnectionGuard, Transport]:
    transport = Transport()
    return ConnectionGuard(transport, LIMITS), transport


def status(transport: Transport) -> int:
    return int(transport.out.split(b" ", 2)[1]) if transport.out else 0


def test_requests_within_the_bounds_pass_whole_even_pipelined() -> None:
    g, transport = guard()
    request = HEAD + b"Content-Length: 2\r\n\r\n{}"
    assert g.admit(request * 3)
    assert g.admit(request[:10]) and g.admit(request[10:])
    assert transport.out == b"" and not g.in_head and not g.in_body


def test_a_large_head_in_one_read_or_many_is_refused_with_431_and_a_half_close() -> None:
    for pieces in (1, 100):
        g, transport = guard()
        request = HEAD + b"X-Big: " + b"a" * 4096 + b"\r\n\r\n"
        size = -(-len(request) // pieces)
        admitted = [g.admit(request[i : i + size]) for i in range(0, len(request), size)]
        assert admitted[-1] == b"" and status(transport) == 431
        assert transport.eof and not transport.closed  # lingers to drain, then closes
        g.expired(time.monotonic() + 60)
        assert transport.closed


def test_a_refusal_behind_pipelined_requests_waits_for_their_answers() -> None:
    """The 431 was written at once, and the complete requests before it in the same read were
    dropped: the client read the 431 as the first one's answer. Now uvicorn reads them, and
    the refusal follows their answers; a 408 waits for the answer being made likewise."""
    request = HEAD + b"Content-Length: 2\r\n\r\n{}"
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(21))
    for owed in (1, 2):
        answering = [False]
        t = Transport()
        g = ConnectionGuard(t, LIMITS, busy=lambda: answering[0])  # noqa: B023 (one a turn)
        assert g.admit(request * owed + HEAD + fields + b"\r\n") == request * owed
        assert t.out == b"" and g.held is not None
        answering[0] = True  # uvicorn answers them, one after the other
        g.answered()
        assert t.out == b""
        answering[0] = False
        g.answered()
        assert status(t) == 431 and t.eof and g.held is None
        assert not g.admit(request)  # nothing more is read: it drains
    # A head over the cap across reads, while the request before it is being answered
    answering = True
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: answering)
    assert g.admit(request) and g.admit(HEAD + b"X-Big: ")
    assert not g.admit(b"a" * 4096) and t.out == b""
    answering = False
    g.answered()
    assert status(t) == 431
    # A slow head behind a request still being answered
    answering = True
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: answering)
    assert g.admit(request + HEAD)
    g.expired(time.monotonic() + 60)
    assert t.out == b"" and not t.closed
    answering = False
    g.answered()
    assert status(t) == 408 and b"head" in t.out
    # A fault in a body, or a slow body, whose head uvicorn read: the app is at that request
    # itself (busy), so the refusal waits for nothing (it waited for ever)
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: True)
    assert g.admit(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    assert not g.admit(b"zz\r\n") and status(t) == 400
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: True)
    assert g.admit(HEAD + b"Content-Length: 10\r\n\r\n{}")
    g.expired(time.monotonic() + 60)
    assert status(t) == 408 and b"body" in t.out
    # The answer before it closed the connection: nothing is written after it
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: False)
    assert g.admit(request + HEAD + fields + b"\r\n") == request
    t.closed = True
    g.answered()
    assert t.out == b""


def test_too_many_fields_are_refused_with_431(caplog: pytest.LogCaptureFixture) -> None:
    g, transport = guard()
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(21))
    assert not g.admit(HEAD + fields + b"\r\n")
    assert status(transport) == 431 and b"20 header fields" in transport.out
    [warning] = caplog.records  # logged, as every refusal (only counted before)
    assert warning.levelname == "WARNING" and "431 more than 20 header fields" in warning.message


def test_a_v2_routes_refusal_is_in_the_open_inference_protocols_shape() -> None:
    """The guard answered ``{"detail"}`` on ``/v2`` too, which tritonclient cannot read as an
    error (found by hand)."""
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(21))
    for target, shape in (
        (b"/v2/models/m/infer", b'{"error":'),
        (b"/v2", b'{"error":'),
        (b"/v2x", b'{"detail":'),
        (b"/v1/deployments/d/predict", b'{"detail":'),
    ):
        g, transport = guard()
        assert not g.admit(b"POST " + target + b" HTTP/1.1\r\n" + fields + b"\r\n")
        assert status(transport) == 431
        assert transport.out.split(b"\r\n\r\n", 1)[1].startswith(shape), target


def test_a_refusal_to_an_allowed_pages_origin_carries_the_cors_headers() -> None:
    """With ``RDV_CORS_ORIGINS``, the guard's own refusals (no app answers them) carried no
    CORS header, so a page's script read a network error instead of the 431 or 408 and its
    reason; now they carry what the app's answers carry, for an allowed origin only."""
    app = "https://app.example.com"
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(21))
    cases = [
        (frozenset({app}), app, [f"access-control-allow-origin: {app}", "vary: Origin"]),
        (frozenset({"*"}), app, ["access-control-allow-origin: *"]),
        (frozenset({app}), "https://evil.example", []),
        (frozenset(), app, []),
    ]
    for origins, origin, expected in cases:
        transport = Transport()
        g = ConnectionGuard(transport, dataclasses.replace(LIMITS, cors_origins=origins))
        assert not g.admit(HEAD + f"Origin: {origin}\r\n".encode() + fields + b"\r\n")
        head = transport.out.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        cors = [line for line in head if line.startswith(("access-control-", "vary"))]
        exposed = ["access-control-expose-headers: location, retry-after, "
                   "inference-header-content-length"] if expected else []  # fmt: skip
        assert status(transport) == 431 and cors == expected + exposed, (origins, origin)
    # a slow body's 408, the Origin read with its head
    transport = Transport()
    g = ConnectionGuard(transport, dataclasses.replace(LIMITS, cors_origins=frozenset({app})))
    g.admit(HEAD + f"Origin: {app}\r\nContent-Length: 10\r\n\r\n{{".encode())
    g.expired(time.monotonic() + 60)
    assert status(transport) == 408 and f"access-control-allow-origin: {app}".encode() in (
        transport.out)  # fmt: skip


def test_what_comes_after_a_refusal_is_dropped_up_to_a_bound() -> None:
    g, transport = guard()
    assert not g.admit(HEAD + b"X-Big: " + b"a" * 4096 + b"\r\nX-Next: 1\r\n")
    assert status(transport) == 431
    assert not g.admit(b"a" * (LINGER_BYTES // 2)) and not transport.closed
    assert not g.admit(b"a" * LINGER_BYTES) and transport.closed


def test_slow_heads_and_bodies_expire_with_408_idle_connections_close_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    later = time.monotonic() + 60
    head, head_t = guard()
    head.admit(HEAD)
    head.expired(later)
    assert status(head_t) == 408 and b"head" in head_t.out
    assert "408 the request's head took longer" in caplog.records[-1].getMessage()
    body, body_t = guard()
    body.admit(HEAD + b"Content-Length: 10\r\n\r\n{}")
    body.expired(time.monotonic() + 1)  # not yet
    assert body_t.out == b""
    body.expired(later)
    assert status(body_t) == 408 and b"body" in body_t.out
    idle, idle_t = guard()
    idle.expired(later)
    assert idle_t.out == b"" and idle_t.closed
    answering = True
    served_t = Transport()
    served = ConnectionGuard(served_t, LIMITS, busy=lambda: answering)
    served.admit(HEAD + b"Content-Length: 2\r\n\r\n{}")
    served.expired(later)  # between requests, still being answered: kept
    assert served_t.out == b"" and not served_t.closed
    answering = False
    served.expired(later + 60)  # answered, and no next request began: closed silently
    assert served_t.out == b"" and served_t.closed


def test_a_malformed_request_is_refused_400_naming_the_fault_after_any_answer_owed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn answered every malformed request with a plain-text "Invalid HTTP request
    received." (and a logged warning each). The guard answers it as its other refusals, in
    the route's style, after the answers owed to requests before it."""
    cases = [
        (b"BREW /v1/deployments/d/predict HTTP/1.1\r\n\r\n", b"Invalid method"),
        (b"GET /v2/health/ready HTTP/9.9\r\n\r\n", b"Invalid HTTP version"),
        (HEAD + b"Content-Length: 1x\r\n\r\n", b"Content-Length"),
        (HEAD + b"Bad Header\r\n\r\n", b"header token"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/2 connection preface"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"a TLS handshake"),  # ClientHello
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: t\r\n\r\n", b"not a proxy"),
    ]
    for data, fault in cases:
        g, transport = guard()
        before = REFUSALS.by_status[400]
        assert not g.admit(data) and status(transport) == 400, transport.out
        assert REFUSALS.by_status[400] == before + 1  # rdv_http_refused_total
        head, _, body = transport.out.partition(b"\r\n\r\n")
        assert b"connection: close" in head and transport.eof
        key = b'"error"' if b"/v2/" in data else b'"detail"'
        assert key in body and fault in body, body
        assert fault.decode() in caplog.records[-1].getMessage()  # a warning, as uvicorn's
    request = HEAD + b"Content-Length: 2\r\n\r\n{}"
    connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: t\r\n\r\n"
    for refused in (b"BREW / HTTP/1.1\r\n\r\n", connect):
        # It stood down to uvicorn, which wrote its 400 at once: the request before was lost
        owed, owed_t = guard()
        assert owed.admit(request + refused) == request and owed_t.out == b""
        owed.answered()
        assert status(owed_t) == 400
    answering, busy_t = True, Transport()
    busy = ConnectionGuard(busy_t, LIMITS, busy=lambda: answering)
    assert busy.admit(request) and not busy.admit(b"BREW / HTTP/1.1\r\n\r\n")
    assert busy_t.out == b""
    answering = False
    busy.answered()
    assert status(busy_t) == 400


def test_an_answered_connection_idles_for_the_keep_alive_time_from_its_answer() -> None:
    """The idle time ran from the request, not the answer: after an answer that took longer
    than the head timeout the connection was closed within a second of it, under the client's
    next request (a disconnect without an answer, seen in CI)."""
    answering = True
    t = Transport()
    g = ConnectionGuard(t, LIMITS, busy=lambda: answering)
    g.admit(HEAD + b"Content-Length: 2\r\n\r\n{}")
    now = time.monotonic()
    sweep = now + LIMITS.header_timeout_s + 1
    g.expired(sweep)  # a long answer, waited for: checked again a head timeout later
    answering = False
    g.answered()  # the answer ends just before that check
    g.expired(sweep + LIMITS.header_timeout_s + 1)
    assert not t.closed  # idle for less than the keep-alive time since its answer
    g.expired(now + LIMITS.keep_alive_s + 1)
    assert t.closed and t.out == b""


def test_bytes_that_begin_no_request_do_not_keep_a_connection_open() -> None:
    """A bare CRLF, or a body that arrives after an early answer, stopped uvicorn's keep-alive
    timer for good: such connections stayed open for ever (found by hand)."""
    later = time.monotonic() + 60
    crlf, crlf_t = guard()
    crlf.admit(b"\r\n")
    crlf.expired(later)
    assert crlf_t.closed and crlf_t.out == b""
    again, again_t = guard()
    again.admit(HEAD + b"Content-Length: 2\r\n\r\n{}\r\n")
    again.expired(later)
    assert again_t.closed and again_t.out == b""


def test_an_upgrade_leaves_the_connection_guarded_websocket_or_not() -> None:
    """uvicorn ignores an upgrade (h2c; a websocket too, with ``ws="none"``) and goes on
    serving plain HTTP on the connection: the guard stood down, and one connection could then
    send 100 MB header fields (found by hand)."""
    upgrade = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    for protocol in (b"h2c", b"websocket"):
        g, transport = guard()
        assert g.admit(upgrade.replace(b"h2c", protocol))
        assert not g.admit(HEAD + b"X-Big: " + b"a" * 4096 + b"\r\n\r\n")
        assert status(transport) == 431


CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 2\r\n\r\n{}", b"Content-Length: 2\r\n\r\n", CHUNKED]
)
def test_an_upgrade_with_a_body_is_refused_naming_it_and_one_without_passes(
    framing: bytes,
) -> None:
    """The parser ends an upgrade's message at its head: the app read an empty body (curl
    --http2 on http:// asks for h2c with every POST) and the body was read as the next
    request."""
    g, transport = guard()
    upgrade = HEAD + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    assert g.admit(upgrade + framing) == b""
    assert status(transport) == 400 and b"may not ask to switch protocols" in transport.out
    quiet, quiet_t = guard()
    plain = upgrade + b"Content-Length: 0\r\n\r\n"
    assert quiet.admit(plain) == plain and quiet_t.out == b""


def test_a_client_that_reads_nothing_is_let_go() -> None:
    """Pipelined answers a client never reads waited in the server's memory for ever."""
    g, transport = guard()
    g.admit(HEAD + b"Content-Length: 2\r\n\r\n{}")
    g.write_stuck_since = time.monotonic()
    g.expired(time.monotonic() + 1)
    assert not transport.aborted
    g.expired(time.monotonic() + LIMITS.body_timeout_s + 1)
    assert transport.aborted


def test_chunk_extensions_are_bounded_as_a_head_is() -> None:
    """Found by a helper's fuzzing: a chunk's extension reaches no app and no body cap, and a
    client streamed 2.6 GB of one in 8 s (for as long as the body timeout allowed), holding the
    event loop. Chunks of any size and number, trailers aside, pass as before."""
    chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    for pieces in (
        b"5;" + b"a" * 100_000,
        b"".join(b"1;" + b"e" * 200 + b"\r\nx\r\n" for _ in range(50)),
    ):
        g, transport = guard()
        admitted = [g.admit(chunked)] + [
            g.admit(pieces[i : i + 1000]) for i in range(0, len(pieces), 1000)
        ]
        assert status(transport) == 400 and b"chunk extensions" in transport.out
        assert admitted[-1] == b""
    # the data of a body that began in the head's read gives its later framing no room
    g, transport = guard()
    assert g.admit(chunked + b"10000\r\n" + b"x" * 0x10000)
    g.admit(b"\r\n1;" + b"a" * 20_000)
    assert status(transport) == 400 and b"chunk extensions" in transport.out
    g, transport = guard()
    body = b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in [1] * 5000 + [65536] * 20)
    wire = chunked + body + b"0\r\n\r\n"
    assert all(g.admit(wire[i : i + 4096]) for i in range(0, len(wire), 4096))
    assert transport.out == b"" and g.finished == 1


def test_an_http11_request_without_one_host_field_is_refused_400() -> None:
    """RFC 9112, 3.2: a server must answer 400 to an HTTP/1.1 request with no Host field, or
    with more than one (uvicorn served both, the second whichever Host it read). HTTP/1.0
    needs none; one Host is served as ever."""
    body = b"Content-Length: 2\r\n\r\n{}"
    line = b"POST /v1/deployments/d/predict HTTP/1.1\r\n"
    for head, fields in ((line, 0), (line + b"Host: a\r\nHost: b\r\n", 2)):
        g, transport = guard()
        assert not g.admit(head + body) and status(transport) == 400, transport.out
        assert f"one Host header field, this one {fields}".encode() in transport.out
    for ok in (HEAD + body, b"GET /healthz HTTP/1.0\r\n\r\n", line + b"hOsT: t\r\n" + body):
        g, transport = guard()
        assert g.admit(ok) == ok and transport.out == b""
    # behind a request it owes an answer to, in the same read: refused after that answer
    g, transport = guard()
    assert g.admit(HEAD + body + line + body) == HEAD + body and transport.out == b""
    g.answered()
    assert status(transport) == 400
