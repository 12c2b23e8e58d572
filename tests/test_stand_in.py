"""``rdv serve``'s stand-in (in-process, real sockets): once no gateway process has run for a
while, a caller waiting on the port gets a 503 with Retry-After rather than no answer for as
long as the gateway fails to start (a caller without a timeout hung for good)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.cli.process import listening_socket
from gateway.cli.stand_in import StandIn

pytestmark = pytest.mark.pure


def answered(stand_in: StandIn) -> int:
    """Its count, once the caller's connection is done with (it is counted after the drain)."""
    deadline = time.monotonic() + 3
    while stand_in.answered < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return stand_in.answered


@pytest.fixture
def port_and_stand_in() -> Iterator[tuple[int, StandIn]]:
    listener = listening_socket("127.0.0.1", 0)
    stand_in = StandIn(listener, after_s=0.5).start()  # its 0.5 s count from here
    try:
        yield listener.getsockname()[1], stand_in
    finally:
        stand_in.stop()
        listener.close()


def test_a_caller_gets_a_503_once_no_gateway_has_run_for_a_while(
    port_and_stand_in: tuple[int, StandIn],
) -> None:
    port, stand_in = port_and_stand_in
    url = f"http://127.0.0.1:{port}/v1/deployments/breast-cancer/predict"
    answer = httpx.post(url, content=b"x" * 2_000_000, timeout=5)  # a body it never reads
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "no gateway process is running" in answer.json()["detail"]
    assert stand_in.active  # answered once no gateway had run for after_s, not before
    assert answered(stand_in) == 1


def test_while_a_gateway_runs_the_stand_in_leaves_its_callers_to_it(
    port_and_stand_in: tuple[int, StandIn],
) -> None:
    """A gateway restarting (alive, not yet accepting) takes the waiting connections once up:
    the stand-in must not answer them meanwhile."""
    port, stand_in = port_and_stand_in
    running = threading.Event()
    running.set()

    def supervisor() -> None:
        while running.is_set():
            stand_in.gateways(True)
            time.sleep(0.05)

    loop = threading.Thread(target=supervisor, daemon=True)
    loop.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.8) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            with pytest.raises(TimeoutError):
                conn.recv(100)  # waits in the queue for the gateway
            running.clear()  # the gateway is gone for good: answered after after_s
            conn.settimeout(3)
            assert conn.recv(100).startswith(b"HTTP/1.1 503 ")
    finally:
        running.clear()
        loop.join()
    assert answered(stand_in) == 1


def test_once_rdv_serve_stops_waiting_callers_get_a_503_at_once(
    port_and_stand_in: tuple[int, StandIn],
) -> None:
    """Stopping, the gateways take no more connections; those that waited were reset once the
    listening socket closed after the workers and the log bin stopped (a request sent, then
    reset: taken or not? a helper's probe). From the stop on the stand-in answers at once,
    even while the supervisor still says a gateway runs (it is draining)."""
    port, stand_in = port_and_stand_in
    stand_in.gateways(True)
    stand_in.stopping()
    stand_in.gateways(True)
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/deployments/d/jobs", json={}, timeout=2)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "rdv serve is stopping: the request was not taken" in answer.json()["detail"]
    assert answered(stand_in) == 1


def test_a_stop_answers_every_waiting_connection_before_the_socket_closes() -> None:
    """Answered one at a time (each waiting up to 0.2 s for its head), a burst of connections
    at the stop was still queued when the listening socket closed, and those were reset after
    their request was sent (a helper's live check: 1-2 of ~20 a stop)."""
    listener = listening_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    stand_in = StandIn(listener, after_s=60).start()
    stand_in.stopping()
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
    for conn in conns:
        conn.sendall(b"POST /v1/deployments/d/predict HTTP/1.1\r\nhost: x\r\n"
                     b"content-length: 2\r\n\r\n{}")  # fmt: skip
    stand_in.stop()  # at once: most still wait in the queue
    listener.close()
    for conn in conns:
        with conn:
            assert conn.recv(100).startswith(b"HTTP/1.1 503 "), "reset, or no answer"
    assert stand_in.answered == 30
