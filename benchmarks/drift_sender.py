"""The drift benchmark's traffic: an open loop of single-row predict requests, each due at a
fixed time whatever the answers do, over keep-alive connections, counted by phase (warm-up,
stationary, a fault, its recovery). Apart from ``benchmarks.drift_bench``, which decides the
phases and reads the alerts."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.drift_faults import Rows

DEPLOYMENT = "breast-cancer"
PREDICT = f"/v1/deployments/{DEPLOYMENT}/predict"


def _request(host: str, port: int, row: np.ndarray) -> bytes:
    body = json.dumps({"instances": [[float(v) for v in row]]}).encode()
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


@dataclass
class Sender:
    """An open loop: request i is due at start + i / rate, sent on the first idle connection
    of ``connections`` keep-alive connections (or as soon as one is free)."""

    host: str
    port: int
    rate: float
    rows: Rows
    rng: np.random.Generator
    connections: int = 32
    stagger_s: float = 0.02
    sent: int = 0
    sent_at: list[float] = field(default_factory=list)
    phase_of: list[str] = field(default_factory=list)
    phase: str = "warm-up"
    statuses: dict[int, int] = field(default_factory=dict)
    late_s: float = 0.0
    _buffer: list[np.ndarray] = field(default_factory=list)

    def _next_row(self) -> np.ndarray:
        if not self._buffer:
            self._buffer = list(self.rows(self.rng, 64))
        return self._buffer.pop()

    def switch(self, rows: Rows, phase: str) -> None:
        self.rows, self.phase, self._buffer = rows, phase, []

    async def run(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        workers = []
        for _ in range(self.connections):
            # opened one at a time: a burst of connects is taken by whichever gateway process
            # wakes first, and the other would see almost no traffic
            workers.append(asyncio.create_task(self._connection(queue)))
            await asyncio.sleep(self.stagger_s)
        start = time.monotonic()
        try:
            while not stop.is_set():
                due = start + self.sent / self.rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    self.late_s = max(self.late_s, now - due)
                queue.put_nowait(_request(self.host, self.port, self._next_row()))
                self.sent_at.append(time.time())
                self.phase_of.append(self.phase)
                self.sent += 1
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _connection(self, queue: asyncio.Queue[bytes]) -> None:
        """Sends what is due on one connection, opened again when an answer closes it (the
        gateway closes a connection after ``RDV_REQUESTS_PER_CONNECTION`` answers, 100 under
        ``rdv serve``: the sender's connections died there, and a run sent 3,200 of its
        requests, none of the faults)."""
        while True:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                closing = False
                while not closing:
                    request = await queue.get()
                    writer.write(request)
                    status = int((await reader.readline()).split()[1])
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        name, _, value = line.partition(b":")
                        if name.lower() == b"content-length":
                            length = int(value)
                        elif name.lower() == b"connection" and b"close" in value.lower():
                            closing = True
                    await reader.readexactly(length)
                    self.statuses[status] = self.statuses.get(status, 0) + 1
            finally:
                writer.close()

    def count(self, phase: str, before_s: float | None = None) -> int:
        """Requests of ``phase`` sent before ``before_s`` (epoch seconds), or all of them."""
        return sum(
            1
            for t, p in zip(self.sent_at, self.phase_of, strict=False)
            if p == phase and (before_s is None or t < before_s)
        )
