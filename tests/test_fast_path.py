"""The one way into predict, in process: the documenting FastAPI route and the ASGI handler
answer alike (both through ``predict_reply``), and a forced shutdown of uvicorn still answers the
predict it cancels. The data plane here is a stand-in (answers at once, fails, or waits on an
event): what is tested is the transport; tests/test_http_protocol.py and the end-to-end tests
cover predict itself against a real gateway."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import UnknownDeployment
from gateway.dataplane.service import PredictionService
from gateway.settings import Settings
from gateway.transport.app import create_app
from gateway.transport.expect_continue import CloseUnreadContinue
from gateway.transport.fast_path import PredictFastPath
from rendezvous.spec import FeatureSpec

PREDICT = (
    b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


class StandIn:
    """Answers predict with the deployment and request id; ``missing`` deployments fail as the
    service fails them; ``release``, when given, is awaited first."""

    in_flight = 0
    reading = 0
    max_in_flight = 2048

    def full(self) -> bool:
        return False

    def held_changed(self) -> None:
        pass

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.release = release
        self.started = asyncio.Event()

    async def predict(self, deployment: str, raw: bytes, request_id: str | None) -> Any:
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        if deployment == "missing":
            raise UnknownDeployment(f"deployment {deployment!r} does not exist")
        return {"deployment": deployment, "request_id": request_id, "bytes": len(raw)}


@pytest.mark.parametrize("deployment", ["demo", "missing"])
async def test_the_documenting_route_answers_as_the_fast_path_does(deployment: str) -> None:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1"))
    app.state.service = StandIn()
    answers = []
    for served in (app, PredictFastPath(app, max_body_bytes=1024)):
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post(
                f"/v1/deployments/{deployment}/predict", content=b"{}",
                headers={"X-Request-Id": "r-1", "Content-Type": "application/json"},
            )  # fmt: skip
        answers.append((response.status_code, response.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == (200 if deployment == "demo" else 404)


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
        addresses = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}
        return addresses.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_forced_shutdown_still_answers_the_predict_it_cancels() -> None:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1"))
    service = StandIn(release=asyncio.Event())
    app.state.service = service
    served = CloseUnreadContinue(PredictFastPath(app, 1024))  # as serving_app has it
    config = Config(app=served, http="httptools", lifespan="off")
    config.load()
    protocol = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(PREDICT)
    await asyncio.wait_for(service.started.wait(), 5)
    (task,) = protocol.tasks
    task.cancel()  # what uvicorn does once timeout_graceful_shutdown runs out
    await asyncio.wait({task}, timeout=5)
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), transport.written
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    assert b"shutting down" in body


def test_a_non_finite_answer_is_a_502_naming_the_model_never_invalid_json() -> None:
    from gateway.transport.fast_path import ok

    doc = {"model": {"name": "m", "version": 3, "role": "real"}, "predictions": [{"p": 0.5}]}
    status, body, _ = ok(doc)
    assert status == 200
    for bad in (float("nan"), float("inf")):
        doc["predictions"] = [{"probabilities": {"0": bad, "1": 1.0}}]
        status, body, _ = ok(doc)
        assert status == 502 and b"model m v3 (real)" in body and b"NaN" not in body
    # The letters of null in a fine answer (here its request id) change nothing.
    fine = {"request_id": "null-1", "predictions": [{"probabilities": {"0": 0.25, "1": 0.75}}]}
    status, body, _ = ok(fine)
    assert status == 200 and json.loads(body) == fine


class Tally:
    def __init__(self) -> None:
        self.done: list[tuple[str | None, str]] = []

    def held_changed(self) -> None:
        pass

    def request_done(self, deployment: str | None, outcome: str, seconds: float | None) -> None:
        self.done.append((deployment, outcome))


def full_gateway() -> tuple[HttpToolsProtocol, Transport, PredictionService, Tally]:
    """uvicorn's protocol in front of the fast path and a real ``PredictionService`` (its
    Redis side stands in: nothing here gets that far) already holding its bound."""
    deployments = DeploymentCache(cast(Any, None))
    spec = FeatureSpec.from_names(["a", "b", "c"])
    deployments.deployments["demo"] = cast(
        Any, SimpleNamespace(name="demo", feature_spec=spec, input_rule=None)
    )
    tally = Tally()
    service = PredictionService(
        deployments, cast(Any, None), cast(Any, None),
        max_rows=8, max_in_flight=4, max_backlog=100, metrics=tally,
    )  # fmt: skip
    service.in_flight = 4
    protocol, transport = full_gateway_on(service)
    return protocol, transport, service, tally


def full_gateway_on(service: PredictionService) -> tuple[HttpToolsProtocol, Transport]:
    """A fresh connection to a gateway of that service, with a body cap of 1,024 bytes."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1"))
    app.state.service = service
    served = CloseUnreadContinue(PredictFastPath(app, 1024))  # as serving_app has it
    config = Config(app=served, http="httptools", lifespan="off")
    config.load()
    protocol = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def answered(protocol: HttpToolsProtocol, transport: Transport) -> bytes:
    """What the connection got since the last call, once every request in hand is answered."""
    if protocol.tasks:
        await asyncio.wait(set(protocol.tasks), timeout=5)
    assert not protocol.tasks, f"a request is still unanswered: {transport.written!r}"
    out, transport.written = transport.written, b""
    return out


async def test_a_full_gateway_refuses_from_the_head_and_the_connection_serves_on() -> None:
    protocol, transport, service, tally = full_gateway()
    head = (
        b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    # Not JSON: a 422 once parsed, but the gateway is full and answers from the head: whole,
    # then with only its first bytes arrived (the rest comes after the answer).
    bad = b"not json, not read"
    for sent in (bad, bad[:5]):
        protocol.data_received(head % len(bad) + sent)
        refusal = await answered(protocol, transport)
        status_line, _, rest = refusal.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 429 Too Many Requests", refusal
        assert b"retry-after: 1\r\n" in rest.lower()
        assert b"connection: close" not in rest.lower() and not transport.closed
        assert b"already holds 4 requests" in rest
    assert tally.done == [("demo", "rejected")] * 2  # counted as the service counts them
    # The rest of the refused body, then the next request on the same connection, pipelined:
    # the body is dropped and the next request is read from its start. Below the bound it is
    # parsed (the same bad body: 422, naming the JSON error).
    service.in_flight = 3
    protocol.data_received(bad[5:] + head % len(bad) + bad)
    second = await answered(protocol, transport)
    assert second.startswith(b"HTTP/1.1 422 "), second
    assert b"json" in second.lower()
    assert tally.done[-1] == ("demo", "invalid") and not transport.closed


async def test_a_refusal_to_a_client_expecting_100_continue_closes_the_connection() -> None:
    protocol, transport, _, tally = full_gateway()
    protocol.data_received(
        b"POST /v1/deployments/unknown/predict HTTP/1.1\r\nHost: t\r\n"
        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    refusal = await answered(protocol, transport)
    # No 100 Continue: the client may never send its body, so the connection cannot carry
    # another request.
    assert refusal.startswith(b"HTTP/1.1 429 "), refusal
    assert b"connection: close\r\n" in refusal.lower() and transport.closed
    assert tally.done == [(None, "rejected")]  # an unknown name is not a metric label


async def test_every_answer_that_never_asked_for_a_100_continue_body_closes() -> None:
    """Found by a helper's probe: refusals from the head on other routes (and on predict below
    the bound) kept the connection, whose next request was then read as the refused body
    and answered 408 after the body timeout."""
    protocol, transport, service, _ = full_gateway()
    service.in_flight = 0
    expect = b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    for head, status in (
        (b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
         b"X-Request-Id: a\r\nX-Request-Id: b\r\n", b"422"),
        (b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
         b"Content-Encoding: gzip\r\n", b"415"),
        (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n",
         b"415"),
        (b"POST /admin/deployments HTTP/1.1\r\nHost: t\r\n", b"404"),  # the admin API off
        (b"POST /nowhere HTTP/1.1\r\nHost: t\r\n", b"404"),
    ):  # fmt: skip
        protocol.data_received(head + expect)
        refusal = await answered(protocol, transport)
        assert refusal.startswith(b"HTTP/1.1 " + status), refusal
        assert refusal.lower().count(b"connection: close\r\n") == 1 and transport.closed, refusal
        protocol, transport = full_gateway_on(service)
    protocol.data_received(b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
                           b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")  # fmt: skip
    refusal = await answered(protocol, transport)  # a 413 closes of its own: said once
    assert refusal.startswith(b"HTTP/1.1 413 ") and refusal.lower().count(b"connection:") == 1
    protocol, transport = full_gateway_on(service)
    # A body asked for: the 100 Continue went out, the body came, the connection serves on.
    protocol.data_received(b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n" + expect)
    await asyncio.sleep(0.05)
    assert transport.written.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), transport.written
    protocol.data_received(b"{}")
    reply = await answered(protocol, transport)
    assert b"HTTP/1.1 422 " in reply and b"connection: close" not in reply.lower()
    assert not transport.closed


async def test_bodies_refused_before_the_service_are_counted_as_invalid() -> None:
    """Found by hand: 413 and 415 answered by the fast path never reached
    ``rdv_requests_total``, so a client sending gzip or oversized bodies was invisible."""
    protocol, transport, service, tally = full_gateway()
    service.in_flight = 0
    head = b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
    sent = [
        (head + b"Content-Length: 2000\r\n\r\n", b"413"),  # declared over the cap
        (head + b"Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}", b"415"),
        (head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 1500 + b"x" * 1500 + b"\r\n",
         b"413"),  # found over the cap as it arrives
    ]  # fmt: skip
    for request, status in sent:
        protocol.data_received(request)
        reply = await answered(protocol, transport)
        assert reply.startswith(b"HTTP/1.1 " + status), reply
        protocol.connection_lost(None)
        protocol, transport = full_gateway_on(service)
    assert tally.done == [("demo", "invalid")] * 3


def test_a_path_holding_a_control_character_is_refused_before_any_route() -> None:
    """The routes' patterns end in ``$``, which matches before a final newline: ``/healthz%0A``
    answered as ``/healthz``, an OIP infer with ``%0a`` was scored and archived, and an entity
    key ending in ``%0A`` deleted the entity without it (found by a helper's fuzzing)."""
    from gateway.transport.app import serving_app

    app = serving_app(Settings(redis_url="redis://127.0.0.1:1"))  # no lifespan: no Redis

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for method, path in (("GET", "/healthz%0A"), ("POST", "/v2/models/demo/infer%0a"),
                                 ("DELETE", "/admin/deployments/d/entities/c-17%0A"),
                                 ("GET", "/v1/deployments/d%09x/drift")):  # fmt: skip
                refused = await client.request(method, path)
                assert refused.status_code == 400, (path, refused.text)
                said = refused.json()
                assert "not printable" in (said.get("error") or said.get("detail")), said
            oip = await client.post("/v2/models/demo/infer%0a")
            assert "error" in oip.json()  # the Open Inference Protocol's shape under /v2

    asyncio.run(scenario())


async def test_requests_whose_body_is_still_arriving_count_against_the_bound() -> None:
    """Counted only once their body was read: 120 stalled uploads of 1 MB held 200 MB of a
    gateway with no 429, ``rdv_in_flight_requests`` at 0 (a helper's probe). A request is held
    from its head; the bound's 429 comes to the next one on every way into predict."""
    _, _, service, tally = full_gateway()
    service.in_flight, service.max_in_flight = 0, 2
    head = (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 9\r\n\r\n")  # fmt: skip
    stalled = []
    for _ in range(2):  # head and a first byte, the rest never sent
        protocol, transport = full_gateway_on(service)
        protocol.data_received(head % b"/v1/deployments/demo/predict" + b"{")
        stalled.append((protocol, transport))
    await asyncio.sleep(0.05)
    assert service.reading == 2 and service.held == 2
    for path in (b"/v1/deployments/demo/predict", b"/v2/models/demo/infer"):  # jobs: alike
        protocol, transport = full_gateway_on(service)
        protocol.data_received(head % path + b'{"x": 1}')
        refusal = await answered(protocol, transport)
        assert refusal.startswith(b"HTTP/1.1 429 "), (path, refusal)
        assert b"already holds 2 requests" in refusal, refusal
    assert tally.done[-2:] == [("demo", "rejected")] * 2
    protocol, transport = stalled[0]
    protocol.data_received(b'"a": 1} ')  # its body whole: read, then refused as bad input
    assert (await answered(protocol, transport)).startswith(b"HTTP/1.1 422 ")
    assert service.reading == 1


async def test_the_in_flight_gauge_follows_a_body_still_arriving_with_no_request_ending() -> None:
    """Found by a helper's metrics probe: ``rdv_in_flight_requests`` was written only when a
    request ended or the process answered a scrape itself, so with two gateway processes the
    scrape answered by one summed the other's stale value: 3 while it held 3 stalled uploads
    (0 written), then 3 after they went."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.observability.metrics import FLUSH_S, GatewayMetrics

    def gauge(metrics: GatewayMetrics) -> float:
        text = generate_latest(metrics.registry).decode()  # the registry: no flush of its own
        return next(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "rdv_in_flight_requests"
        )

    _, _, service, _ = full_gateway()
    metrics = GatewayMetrics()
    service.metrics = metrics
    service.held_changed = metrics.held_changed
    metrics.track_in_flight(lambda: service.held)
    service.in_flight = 0
    protocol, _ = full_gateway_on(service)
    protocol.data_received(
        b"POST /v1/deployments/demo/predict HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{"
    )
    await asyncio.sleep(FLUSH_S * 3)
    assert service.held == 1
    assert gauge(metrics) == 1  # written with no request ended and no scrape
    protocol.connection_lost(None)  # the caller goes away: no request ends, nothing counted
    await asyncio.sleep(FLUSH_S * 3)
    assert service.held == 0
    assert gauge(metrics) == 0
