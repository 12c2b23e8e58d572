"""HTTP/1.1 on the gateway's predict path (uvicorn's httptools protocol, then
``gateway.transport.fast_path``), over raw sockets to a real ``rdv gateway`` with real
workers: keep-alive, pipelining, closing, body limits, chunked bodies, unusual requests."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.train import demo_data
from processes import PREDICT, System, launch_system, wait_until
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=2000, fallbacks=("canary",), grace_ms=100)
MAX_BODY = 4096
MAX_HEAD = 2048
PER_CONNECTION = 5
KEEP_ALIVE_S = 3.0
"""Requests a connection serves before its last answer closes it (no other test here sends as
many on one connection)."""
APP_ORIGIN = "https://app.example.com"
"""The one origin whose browser pages may call this gateway (given with a trailing slash, as
people write it)."""


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_MAX_BODY_BYTES=str(MAX_BODY), RDV_MAX_HEADER_BYTES=str(MAX_HEAD),
                       RDV_MAX_HEADERS="20", RDV_HEADER_TIMEOUT_S="1",
                       RDV_BODY_TIMEOUT_S="1", RDV_KEEP_ALIVE_S=str(KEEP_ALIVE_S),
                       RDV_REQUESTS_PER_CONNECTION=str(PER_CONNECTION),
                       RDV_CORS_ORIGINS=json.dumps([APP_ORIGIN + "/"])) as sys:  # fmt: skip
        sys.start_worker("real")
        sys.start_worker("canary")
        yield sys


ROW = demo_data().x_test[0].tolist()
FEEDBACK = PREDICT.replace("/predict", "/feedback")


def body() -> bytes:
    return json.dumps({"instances": [ROW]}).encode()


def request(path: str = PREDICT, payload: bytes | None = None, *headers: str,
            version: str = "1.1") -> bytes:  # fmt: skip
    payload = body() if payload is None else payload
    head = [f"POST {path} HTTP/{version}", "Host: test", "Content-Type: application/json",
            *headers]  # fmt: skip
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


class Conn:
    """One client connection that reads responses one at a time."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.response_head()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        content, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, content

    def response_head(self) -> tuple[int, dict[str, str]]:
        """A response's status and header fields (all of a response to HEAD)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        return int(status_line.split()[1]), headers

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole response")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(system: System) -> Iterator[Conn]:
    c = Conn(system.port)
    yield c
    c.close()


def test_keep_alive_serves_many_predicts_on_one_connection(conn: Conn) -> None:
    for i in range(3):
        conn.send(request(PREDICT, None, f"X-Request-Id: ka-{i}"))
        status, headers, content = conn.response()
        doc = json.loads(content)
        assert status == 200 and doc["request_id"] == f"ka-{i}", content
        assert doc["model"]["role"] == "real" and len(doc["predictions"]) == 1
        assert headers["content-type"] == "application/json"
        assert "date" in headers and "connection" not in headers


def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    conn.send(request(PREDICT, None, "X-Request-Id: p-1")
              + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
              + request(PREDICT, None, "X-Request-Id: p-2")
              + request(PREDICT, b"{not json"))  # fmt: skip
    first, health, second, bad = (conn.response() for _ in range(4))
    assert first[0] == 200 and json.loads(first[2])["request_id"] == "p-1"
    assert health[0] == 200 and json.loads(health[2]) == {"status": "ok"}
    assert second[0] == 200 and json.loads(second[2])["request_id"] == "p-2"
    assert bad[0] == 422 and "detail" in json.loads(bad[2])
    # No answer names the server software, on the fast path or the ASGI one.
    assert not [r for r in (first, health, second, bad) if "server" in r[1]]


def test_a_connection_is_closed_by_its_last_answer_past_its_requests(conn: Conn) -> None:
    """RDV_REQUESTS_PER_CONNECTION: the answer to the fifth request says so and the gateway
    closes the connection after it; the client reconnects (where several gateway processes
    share the port, most often to the less busy one)."""
    for i in range(1, PER_CONNECTION + 1):
        conn.send(request(PREDICT, None, f"X-Request-Id: rpc-{i}"))
        status, headers, content = conn.response()
        assert status == 200 and json.loads(content)["request_id"] == f"rpc-{i}", content
        assert headers.get("connection") == ("close" if i == PER_CONNECTION else None), i
    assert conn.closed_by_server()


def test_requests_pipelined_past_the_bound_are_all_answered(conn: Conn) -> None:
    """The fifth was to be the last, but a sixth came behind it before its answer started:
    the connection stays open for the sixth, whose answer closes it. Nothing is dropped."""
    for i in range(1, PER_CONNECTION - 1):
        conn.send(request(PREDICT, None, f"X-Request-Id: pl-{i}"))
        assert conn.response()[0] == 200
    last = PER_CONNECTION + 1
    conn.send(b"".join(request(PREDICT, None, f"X-Request-Id: pl-{i}")
                       for i in range(PER_CONNECTION - 1, last + 1)))  # fmt: skip
    for i in range(PER_CONNECTION - 1, last + 1):
        status, headers, content = conn.response()
        assert status == 200 and json.loads(content)["request_id"] == f"pl-{i}", content
        assert headers.get("connection") == ("close" if i == last else None), i
    assert conn.closed_by_server()


def test_head_probes_of_health_and_readiness_get_their_status_without_a_body(
    conn: Conn,
) -> None:
    """Some uptime monitors and load balancers probe with HEAD: it was a 405."""
    for path in ("/healthz", "/readyz"):
        conn.send(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        status, headers = conn.response_head()  # Content-Length: what a GET would carry
        assert status == 200 and int(headers["content-length"]) > 0, (path, headers)
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, content = conn.response()  # the HEADs sent no body: this is the next answer
    assert status == 200 and content == b'{"status":"ok"}'


def test_http_1_0_and_connection_close_are_honoured(system: System) -> None:
    for extra, version in (((), "1.0"), (("Connection: close",), "1.1")):
        c = Conn(system.port)
        try:
            c.send(request(PREDICT, None, *extra, version=version))
            status, headers, _ = c.response()
            assert status == 200 and headers["connection"] == "close"
            assert c.closed_by_server()
        finally:
            c.close()


def test_bodies_over_the_cap_are_refused_declared_or_chunked(system: System) -> None:
    big = b'{"instances": [' + b"[1.0]," * MAX_BODY + b"[1.0]]}"
    declared, chunked = Conn(system.port), Conn(system.port)
    try:
        declared.send(request(PREDICT, big))
        status, headers, content = declared.response()
        assert status == 413 and f"{MAX_BODY} bytes" in json.loads(content)["detail"]
        assert headers["connection"] == "close" and declared.closed_by_server()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i : i + 1000]), big[i : i + 1000])
                          for i in range(0, len(big), 1000))  # fmt: skip
        chunked.send(request(PREDICT, chunks + b"0\r\n\r\n", "Transfer-Encoding: chunked"))
        assert chunked.response()[0] == 413
    finally:
        declared.close()
        chunked.close()


def test_a_chunked_body_within_the_cap_is_served(conn: Conn) -> None:
    payload = body()
    half = len(payload) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, payload[:half], len(payload) - half,
                                                     payload[half:])  # fmt: skip
    conn.send(request(PREDICT, chunks, "Transfer-Encoding: chunked", "X-Request-Id: chunky"))
    status, _, content = conn.response()
    assert status == 200 and json.loads(content)["request_id"] == "chunky"


def test_unusual_requests_take_the_asgi_path_and_get_the_same_answer(conn: Conn) -> None:
    conn.send(request(PREDICT, None, "Expect: 100-continue", "X-Request-Id: expect"))
    status, _, _ = conn.response()
    if status == 100:  # the interim answer, then the real one
        status, _, content = conn.response()
    assert status == 200 and json.loads(content)["request_id"] == "expect"
    encoded = PREDICT.replace("-", "%2D")
    conn.send(request(encoded + "?trace=1", None, "X-Request-Id: encoded"))
    status, _, content = conn.response()
    assert status == 200 and json.loads(content)["request_id"] == "encoded"
    conn.send(request("/v1/deployments/no-such/predict"))
    status, _, content = conn.response()
    assert status == 404 and "no-such" in json.loads(content)["detail"]
    # Refused from its head, its body never asked for: the answer closes the connection (the
    # next request was read as the body and answered 408; a helper's probe).
    conn.send(request(PREDICT, b"", "Expect: 100-continue", "Content-Encoding: gzip",
                      "Content-Length: 450"))  # fmt: skip
    status, headers, _ = conn.response()
    assert status == 415 and headers.get("connection") == "close", headers


def test_a_client_that_leaves_mid_request_does_not_disturb_the_next(system: System) -> None:
    gone = Conn(system.port)
    gone.send(request(PREDICT, None, "X-Request-Id: gone"))
    gone.close()
    for path in (FEEDBACK, PREDICT):  # gone mid-body: the route's read of it fails
        half = Conn(system.port)
        whole = request(path, b'[{"request_id": "x", "label": 1}]' + b" " * 2000)
        half.send(whole[: len(whole) - 1000])
        half.close()
    c = Conn(system.port)
    try:
        c.send(request(PREDICT, None, "X-Request-Id: after"))
        status, _, content = c.response()
        assert status == 200 and json.loads(content)["request_id"] == "after"
    finally:
        c.close()
    # Nothing of ours failed: no traceback (the feedback route logged one for each, by hand)
    assert "Traceback" not in system.procs["gateway"].log_text()


def test_a_head_over_the_cap_or_with_too_many_fields_is_refused_431(system: System) -> None:
    """... and a page of an allowed origin may read the refusal (CORS headers)."""
    for extra in (("X-Big: " + "a" * MAX_HEAD,), tuple(f"X-N{i}: {i}" for i in range(21))):
        c = Conn(system.port)
        try:
            c.send(request(PREDICT, None, f"Origin: {APP_ORIGIN}", *extra))
            status, headers, content = c.response()
            assert status == 431 and "detail" in json.loads(content), content
            assert headers["access-control-allow-origin"] == APP_ORIGIN, headers
            assert headers["connection"] == "close" and c.closed_by_server()
        finally:
            c.close()


@pytest.mark.parametrize("refused", ["431", "400"])
def test_a_refusal_behind_a_pipelined_request_is_answered_after_it(
    system: System, refused: str
) -> None:
    """Both in one write: the predict was dropped and the refusal came as the first answer
    (a 431 of the guard's, or uvicorn's plain-text 400 for a malformed request)."""
    c = Conn(system.port)
    try:
        bad = (request(PREDICT, None, "X-Big: " + "a" * MAX_HEAD) if refused == "431"
               else b"BREW / HTTP/1.1\r\nHost: t\r\n\r\n")  # fmt: skip
        c.send(request(PREDICT, None, f"X-Request-Id: before-{refused}") + bad)
        status, _, content = c.response()
        assert status == 200 and json.loads(content)["request_id"] == f"before-{refused}"
        status, headers, content = c.response()
        assert status == int(refused) and headers["connection"] == "close", content
        assert "detail" in json.loads(content) and c.closed_by_server()
    finally:
        c.close()


def test_an_endless_header_is_cut_off_early(system: System) -> None:
    """A header that never ends is refused once the head passes the cap: the gateway closes the
    connection instead of holding what comes (the sends fail long before 64 MB)."""
    c = Conn(system.port)
    sent = 0
    try:
        c.send(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        with pytest.raises(OSError):
            for _ in range(1024):
                c.send(b"a" * 65536)
                sent += 65536
    finally:
        c.close()
    assert sent < 16 * 1024 * 1024


def test_slow_heads_and_bodies_get_408_and_silent_connections_are_closed(
    system: System,
) -> None:
    slow_head, short_body, silent = Conn(system.port), Conn(system.port), Conn(system.port)
    try:
        slow_head.send(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: t\r\n")
        payload = body()
        short_body.send(request(PREDICT, payload)[: -len(payload) // 2])  # half the body
        for c, phase in ((slow_head, "head"), (short_body, "body")):
            status, _, content = c.response()  # within a few seconds (socket timeout 10)
            assert status == 408 and phase in json.loads(content)["detail"], content
            assert c.closed_by_server()
        assert silent.closed_by_server()
    finally:
        for c in (slow_head, short_body, silent):
            c.close()


def test_an_answered_connection_is_kept_for_the_keep_alive_time_then_closed(
    system: System,
) -> None:
    """It was closed once the head timeout had passed since its request (uvicorn's own timer:
    5 s, equal to httpx's pool expiry): a client reusing it then met a disconnect without an
    answer (CI, a burst of job polls)."""
    c = Conn(system.port)
    try:
        c.send(request(PREDICT))
        assert c.response()[0] == 200
        time.sleep(2.2)  # past RDV_HEADER_TIMEOUT_S (1 s) and a sweep, within the keep-alive
        c.send(request(PREDICT))
        assert c.response()[0] == 200
        answered = time.monotonic()
        assert c.closed_by_server()  # socket timeout 10 s
        idle = time.monotonic() - answered
        assert KEEP_ALIVE_S - 0.5 < idle < KEEP_ALIVE_S + 2, idle
    finally:
        c.close()


def test_a_body_that_is_not_utf8_gets_422_naming_the_encoding(conn: Conn) -> None:
    for payload in (b'{"instances": [[\xff]]}', '{"instances": [[1.0]]}'.encode("utf-16")):
        conn.send(request(PREDICT, payload))
        status, _, content = conn.response()
        assert status == 422 and "UTF-8" in json.loads(content)["detail"][0]["msg"], content
    conn.send(request(PREDICT, None, "X-Request-Id: still-served"))
    assert conn.response()[0] == 200


def test_idle_bytes_and_an_h2c_upgrade_get_no_way_round_the_bounds(system: System) -> None:
    """Found by hand: a connection that sent a bare CRLF, or one answered and then sent a
    CRLF, stayed open for ever; and after an ``Upgrade: h2c`` request the guard stood down."""
    crlf, answered, upgraded = Conn(system.port), Conn(system.port), Conn(system.port)
    try:
        crlf.send(b"\r\n")
        answered.send(request(PREDICT))
        assert answered.response()[0] == 200
        answered.send(b"\r\n")
        upgraded.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                      b"Upgrade: h2c\r\n\r\n")  # fmt: skip
        assert upgraded.response()[0] == 200
        upgraded.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4 * MAX_HEAD
                      + b"\r\n\r\n")  # fmt: skip
        assert upgraded.response()[0] == 431
        assert crlf.closed_by_server() and answered.closed_by_server()  # socket timeout 10 s
    finally:
        for c in (crlf, answered, upgraded):
            c.close()


def test_a_malformed_request_gets_a_400_naming_the_fault_and_the_connection_closes(
    system: System,
) -> None:
    """It was uvicorn's plain-text "Invalid HTTP request received." whatever the fault."""
    for data, key, fault in [
        (b"BREW /v1/deployments/x/predict HTTP/1.1\r\nHost: t\r\n\r\n", "detail", "method"),
        (b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nNo Colon\r\n\r\n", "error", "header"),
    ]:
        c = Conn(system.port)
        try:
            c.send(data)
            status, headers, content = c.response()
            assert status == 400 and headers["connection"] == "close", headers
            message = json.loads(content)[key]
            assert message.startswith("malformed HTTP request") and fault in message, message
            assert c.closed_by_server()
        finally:
            c.close()

    def refused() -> float:  # another gateway process's count lags by its flush interval
        lines = system.http.get("/metrics").text.splitlines()
        series = 'rdv_http_refused_total{status="400"}'
        return sum(float(line.split()[-1]) for line in lines if line.startswith(series))

    wait_until(lambda: refused() >= 2, 5, "rdv_http_refused_total to count both")
    served = Conn(system.port)  # the gateway serves on
    try:
        served.send(request(PREDICT))
        assert served.response()[0] == 200
    finally:
        served.close()


def test_a_compressed_body_is_refused_415_naming_the_encoding(conn: Conn) -> None:
    """It read as 422 "not UTF-8" on predict and jobs, where /v2 said 415 (found by hand)."""
    packed = gzip.compress(body())
    for path in (PREDICT, PREDICT.replace("/predict", "/jobs")):
        conn.send(request(path, packed, "Content-Encoding: gzip"))
        status, _, content = conn.response()
        assert status == 415 and "'gzip'" in json.loads(content)["detail"], content
    conn.send(request(PREDICT, body(), "Content-Encoding: identity"))
    assert conn.response()[0] == 200


def test_a_browser_page_of_an_allowed_origin_may_call_predict_and_others_may_not(
    system: System,
) -> None:
    """CORS: the preflight a browser sends before a JSON POST, then the call itself (on the
    fast path, and on a framework route); another origin's preflight is refused."""
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, x-request-id"}  # fmt: skip
    allowed = system.http.options(PREDICT, headers={"Origin": APP_ORIGIN, **preflight})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "x-request-id" in allowed.headers["access-control-allow-headers"].lower()
    other = system.http.options(PREDICT, headers={"Origin": "https://evil.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    answer = system.http.post(PREDICT, content=body(), headers={"Origin": APP_ORIGIN})
    assert answer.status_code == 200 and answer.json()["predictions"], answer.text
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()
    health = system.http.get("/healthz", headers={"Origin": APP_ORIGIN})
    assert health.headers["access-control-allow-origin"] == APP_ORIGIN
    for headers in ({}, {"Origin": "https://evil.example"}):  # nothing for them
        plain = system.http.post(PREDICT, content=body(), headers=headers)
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


WEBSOCKET = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip


def test_an_upgrade_is_ignored_and_the_request_answered_as_http(system: System) -> None:
    """A WebSocket handshake got 403 with an empty body on every path (uvicorn refused it for
    the app, which has no WebSocket route): the gateway speaks HTTP/1.1 alone, so the Upgrade
    is ignored (RFC 9110, 7.8) and the route answers. A request with a body and an Upgrade
    (curl --http2 sends h2c with every POST) was read with an empty body: refused, naming it."""
    c = Conn(system.port)
    try:
        for path, expected in [("/healthz", 200), ("/nowhere", 404), (PREDICT, 405)]:
            c.send("\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *WEBSOCKET, "", ""]).encode())
            status, _, content = c.response()
            assert status == expected and json.loads(content), (path, status, content)
    finally:
        c.close()
    for upgrade in (WEBSOCKET, ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c")):
        c = Conn(system.port)
        try:
            c.send(request(PREDICT, None, *upgrade))
            status, headers, content = c.response()
            assert status == 400 and headers["connection"] == "close", (status, content)
            assert "may not ask to switch protocols" in json.loads(content)["detail"]
        finally:
            c.close()
    log = (system.logs / "gateway.log").read_text()
    assert "Unsupported upgrade request" not in log and "WebSocket library" not in log
