"""While no gateway process of ``rdv serve`` runs, a stand-in answers its port with 503.

``rdv serve`` holds the listening socket its gateway processes accept on, so connections that
arrive while none runs wait in the socket's queue and the next gateway up takes them: a
crashed gateway's restart (half a second) loses none. But a gateway that cannot start (every
start fails: a Redis that refuses it, a broken install) is restarted with pauses growing to
30 s, for ever, and meanwhile the queue held its callers without an answer; one without a
timeout hung (as did every caller while a first start trained the demo models). Once no
gateway process has run for ``after_s``, the stand-in answers each waiting connection 503 with
``Retry-After`` and a line saying why, until one runs again. It never reads what was asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time

log = logging.getLogger(__name__)

AFTER_S = 5.0
"""How long without a gateway process before the stand-in answers: longer than a crashed
gateway's restart (its first pause is 0.5 s), so callers then wait for it rather than fail."""
RETRY_AFTER_S = 5
HEAD_WAIT_S = 0.2
"""How long the stand-in waits for a connection's first bytes: one connection at a time, so
an idle client must not hold the others up."""
DRAIN_S = 0.5
"""How long a connection's request is read after the answer: closed with unread bytes, the
kernel resets it, and the caller may lose the answer (a body still arriving)."""


def _answer_of(detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: application/json\r\n"
        b"retry-after: %d\r\n"
        b"connection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (RETRY_AFTER_S, len(body), body)
    )


ANSWER = _answer_of(
    "no gateway process is running on this port: rdv serve is starting one, or stopping (a "
    "gateway that fails to start is retried; its log says why)"
)
STOPPING = _answer_of("rdv serve is stopping: the request was not taken; send it again later")
"""From the moment ``rdv serve`` stops: its gateways take no more connections, and those that
waited for one were reset once the listening socket closed, after the workers and the log bin
had stopped (a request sent, then reset: a job submitted or not?; a helper's probe)."""


class StandIn:
    """Answers ``listener``'s connections with ``ANSWER`` once ``gateways(True)`` has not been
    said for ``after_s`` (from its start on), in a thread of its own."""

    def __init__(self, listener: socket.socket, after_s: float = AFTER_S):
        self._listener = listener
        listener.setblocking(False)  # a gateway may take a connection first (asyncio's is so)
        self.after_s = after_s
        self._seen_s = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stand-in", daemon=True)
        self._stopping = False
        self._answering: list[threading.Thread] = []
        self.answered = 0

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def gateways(self, running: bool) -> None:
        """The supervisor's word, every loop: whether a gateway process runs now."""
        if running:
            self._seen_s = time.monotonic()

    def stopping(self) -> None:
        """``rdv serve`` stops: answer every connection from now on, saying so."""
        self._stopping = True

    @property
    def active(self) -> bool:
        return self._stopping or time.monotonic() - self._seen_s > self.after_s

    def stop(self) -> None:
        """Stop answering; once ``stopping``, the connections waiting are answered and the
        listening socket closed in one go, so that none is left in its queue to be reset."""
        self._stop.set()
        self._thread.join(timeout=DRAIN_S + 2)
        for answering in list(self._answering):
            answering.join(timeout=DRAIN_S + 1)

    def _serve(self) -> None:
        said = False
        while not self._stop.is_set() or self._stopping:
            if self._stop.is_set():  # stopping: the last of the queue, then the socket closes
                self._drain_and_close()
                return
            if not self.active:
                said = False
                self._stop.wait(0.1)
                continue
            if not said and not self._stopping:
                log.warning("no gateway process for %.0f s: answering its port 503 meanwhile",
                            self.after_s)  # fmt: skip
                said = True
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready or not self.active:
                    continue
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):  # the listener closed: rdv serve is stopping
                return
            if self._stopping:  # many arrive at once: each in a thread of its own, or the
                self._answer_aside(conn)  # queue waits out one head wait each (and is reset)
            else:
                with conn:
                    self._answer(conn)

    def _drain_and_close(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, ValueError):  # already closed
                return
            self._answer_aside(conn)
        with contextlib.suppress(OSError):
            self._listener.close()

    def _answer_aside(self, conn: socket.socket) -> None:
        def answer() -> None:
            with conn:
                self._answer(conn)

        thread = threading.Thread(target=answer, name="stand-in answer", daemon=True)
        self._answering = [t for t in self._answering if t.is_alive()] + [thread]
        thread.start()

    def _answer(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        try:
            conn.settimeout(HEAD_WAIT_S)
            with contextlib.suppress(TimeoutError):
                conn.recv(65536)  # the request's head, or its start: what it asks is no matter
            conn.settimeout(DRAIN_S)
            conn.sendall(STOPPING if self._stopping else ANSWER)
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_S
            while time.monotonic() < deadline and conn.recv(65536):
                pass
        except OSError:
            pass
        self.answered += 1
