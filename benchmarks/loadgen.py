"""The load generator: raw HTTP/1.1 over keep-alive connections, in processes of its own.

Every system is driven by the same code. Request bytes are built once; a connection writes
them and reads the status line, headers and a ``Content-Length`` (or chunked) body, nothing
more, so the client's cost per request stays small and is measured (``getrusage`` in each
load process). Two loops:

- closed: ``concurrency`` connections, each sending its next request when the last answered;
- open: requests scheduled at a fixed rate whatever the answers do; latency counts from the
  scheduled send time, so a stall is not hidden (no coordinated omission).

A phase runs in ``procs`` spawned processes that open their connections first, report ready,
then start together on the parent's signal; their latencies are merged. The latencies of 200s
and of 429s (refusals) are kept apart; an answer that closes the connection is counted by its
status and the connection is opened again for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import resource
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
OPEN_LOOP_MAX_CONNECTIONS = 256
"""Per load process: how many requests an open loop may hold outstanding at once."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    bodies: tuple[bytes, ...]
    """Request bodies, sent in turn (one real row each)."""

    def requests(self) -> list[bytes]:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
        )
        return [head.replace("{n}", str(len(b))).encode() + b for b in self.bodies]


@dataclass(frozen=True)
class Load:
    mode: str
    """``closed`` or ``open``."""
    concurrency: int = 1
    """Closed loop: connections, each with one request outstanding."""
    rate: float = 0.0
    """Open loop: requests per second in all."""
    duration_s: float = 5.0

    @property
    def label(self) -> str:
        return f"c{self.concurrency}" if self.mode == "closed" else f"open{self.rate:g}"


@dataclass
class ProcResult:
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    """Of the 200s."""
    refused_ms: array[float] = field(default_factory=lambda: array("d"))
    """Of the 429s."""
    send_lag_ms: array[float] = field(default_factory=lambda: array("d"))
    """Open loop: how late each request was written after its scheduled time (the load
    generator's own timer and connection wait, included in its latency)."""
    answered_at_s: array[float] = field(default_factory=lambda: array("d"))
    """When each 200 was sent (the open loop: scheduled), in seconds from the phase's start,
    beside ``latencies_ms``: latencies over time for a long phase (the soak)."""
    failed_at_s: array[float] = field(default_factory=lambda: array("d"))
    """When each request that got neither a 200 nor a 429 was sent, from the start."""
    statuses: Counter[str] = field(default_factory=Counter)
    start: float = 0.0
    """``perf_counter`` at the go (the clock is the machine's, common to the processes)."""
    sent: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0


class HttpError(Exception):
    pass


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.closing = False
        """The last answer said ``Connection: close``: open another for the next request."""

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
        )
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> int:
        """Send one request, read its whole response; return the status code (``closing``
        says whether the server closes the connection after it)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:60]!r}")
        length = -1
        chunked = close = False
        for line in headers.lower().split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = b"close" in value
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length > 0:
            await self.reader.readexactly(length)
        elif length < 0:
            raise HttpError("response without Content-Length")
        self.closing = close
        return int(parts[1])

    def close(self) -> None:
        self.writer.close()


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


def _record(out: ProcResult, status: int, t0: float, t1: float) -> None:
    out.statuses[str(status)] += 1
    if status == 200:
        out.latencies_ms.append(_ms(t0, t1))
        out.answered_at_s.append(t0 - out.start)
    elif status == 429:
        out.refused_ms.append(_ms(t0, t1))
    else:
        out.failed_at_s.append(t0 - out.start)


def _failed(out: ProcResult, exc: BaseException, t0: float) -> None:
    out.statuses[f"error:{type(exc).__name__}"] += 1
    out.failed_at_s.append(t0 - out.start)


async def closed_conn(
    target: Target,
    requests: list[bytes],
    offset: int,
    end: float,
    out: ProcResult,
    conn: Connection | None,
) -> None:
    i = offset
    while time.perf_counter() < end:
        request = requests[i % len(requests)]
        i += 1
        t0 = time.perf_counter()
        out.sent += 1
        try:
            if conn is None:
                conn = await Connection.open(target.host, target.port)
            status = await asyncio.wait_for(conn.roundtrip(request), REQUEST_TIMEOUT_S)
        except (OSError, HttpError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            _failed(out, exc, t0)
            if conn is not None:
                conn.close()
            conn = None
            await asyncio.sleep(0.01)  # a refused connection must not spin the loop
            continue
        _record(out, status, t0, time.perf_counter())
        if conn.closing:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


async def _closed(
    target: Target, load: Load, n_conns: int, offset: int, ready: Callable[[], float]
) -> ProcResult:
    requests = target.requests()
    conns = [await Connection.open(target.host, target.port) for _ in range(n_conns)]
    start = ready()
    end = start + load.duration_s
    out = ProcResult(start=start)
    await asyncio.gather(
        *(
            closed_conn(target, requests, offset + k * 7, end, out, conn)
            for k, conn in enumerate(conns)
        )
    )
    out.elapsed_s = load.duration_s
    return out


async def _open(
    target: Target, rate: float, duration_s: float, offset: int, ready: Callable[[], float]
) -> ProcResult:
    requests = target.requests()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    warm = min(32, OPEN_LOOP_MAX_CONNECTIONS)
    for _ in range(warm):
        idle.put_nowait(await Connection.open(target.host, target.port))
    total = warm
    out = ProcResult()

    async def one(request: bytes, t_sched: float) -> None:
        nonlocal total
        conn: Connection | None = None
        try:
            if idle.empty() and total < OPEN_LOOP_MAX_CONNECTIONS:
                total += 1
                conn = await Connection.open(target.host, target.port)
            else:
                conn = await idle.get()
            out.send_lag_ms.append(_ms(t_sched, time.perf_counter()))
            status = await asyncio.wait_for(conn.roundtrip(request), REQUEST_TIMEOUT_S)
        except (OSError, HttpError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            _failed(out, exc, t_sched)
            if conn is not None:
                conn.close()
            total -= 1
            return
        _record(out, status, t_sched, time.perf_counter())
        if conn.closing:
            conn.close()
            total -= 1
        else:
            idle.put_nowait(conn)

    start = out.start = ready()
    end = start + duration_s
    interval_s = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while True:
        t_sched = start + i * interval_s
        if t_sched >= end:
            break
        now = time.perf_counter()
        if t_sched > now:
            await asyncio.sleep(t_sched - now)
        # Send everything that is due (the timer may wake us late), each at its own time.
        while (t_sched := start + i * interval_s) <= time.perf_counter() and t_sched < end:
            task = asyncio.get_running_loop().create_task(
                one(requests[(offset + i) % len(requests)], t_sched)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            out.sent += 1
            i += 1
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            out.statuses["error:unfinished"] += len(pending)
    while not idle.empty():
        idle.get_nowait().close()
    out.elapsed_s = duration_s
    return out


def _child(target: Target, load: Load, index: int, share: int | float, queue: Any, go: Any) -> None:
    """One load process: connect, report ready, wait for the go, run, report the result."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    def ready() -> float:
        queue.put(("ready", index))
        go.wait()
        return time.perf_counter()

    async def main() -> ProcResult:
        if load.mode == "closed":
            return await _closed(target, load, int(share), index * 1009, ready)
        return await _open(target, float(share), load.duration_s, index * 1009, ready)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        result = asyncio.run(main())
    except Exception as exc:  # report, so that the parent does not wait forever
        queue.put(("failed", index, f"{type(exc).__name__}: {exc}"))
        return
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    queue.put(("done", index, result))


def _shares(load: Load, procs: int) -> list[int | float]:
    if load.mode == "closed":
        procs = max(1, min(procs, load.concurrency))
        base, extra = divmod(load.concurrency, procs)
        return [base + (1 if k < extra else 0) for k in range(procs)]
    return [load.rate / procs] * procs


def run_load(
    target: Target,
    load: Load,
    procs: int,
    on_start: Callable[[], None] | None = None,
    while_running: Callable[[], None] | None = None,
) -> tuple[ProcResult, list[float]]:
    """Run one phase in ``procs`` load processes; returns the merged result and the CPU
    seconds of each load process. ``on_start`` runs just before the go (e.g. a CPU
    snapshot), ``while_running`` is called about every 0.2 s until the results are in."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    shares = _shares(load, procs)
    children = [
        ctx.Process(target=_child, args=(target, load, k, s, queue, go), daemon=True)
        for k, s in enumerate(shares)
    ]
    for child in children:
        child.start()
    results: dict[int, ProcResult] = {}
    try:
        ready = 0
        while ready < len(children):
            msg = _get(queue, children)
            if msg[0] == "failed":
                raise RuntimeError(f"load process {msg[1]} failed: {msg[2]}")
            ready += msg[0] == "ready"
        if on_start is not None:
            on_start()
        go.set()
        while len(results) < len(children):
            msg = _get(queue, children, while_running, wait_s=120.0 + load.duration_s)
            if msg[0] == "failed":
                raise RuntimeError(f"load process {msg[1]} failed: {msg[2]}")
            results[msg[1]] = msg[2]
    finally:
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
    merged = ProcResult()
    for r in results.values():
        merged.latencies_ms.extend(r.latencies_ms)
        merged.answered_at_s.extend(r.answered_at_s)
        merged.failed_at_s.extend(r.failed_at_s)
        merged.refused_ms.extend(r.refused_ms)
        merged.send_lag_ms.extend(r.send_lag_ms)
        merged.statuses.update(r.statuses)
        merged.sent += r.sent
        merged.elapsed_s = max(merged.elapsed_s, r.elapsed_s)
    return merged, [r.cpu_s for r in results.values()]


def _get(
    queue: Any, children: list[Any], tick: Callable[[], None] | None = None, wait_s: float = 120.0
) -> Any:
    """The next message; fails if every load process died without a word, or none came in
    ``wait_s`` (the results come after the phase's whole duration)."""
    import queue as queue_mod

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.2)
        except queue_mod.Empty:
            if tick is not None:
                tick()
            if not any(c.is_alive() for c in children):
                raise RuntimeError("every load process exited without a result") from None
    raise RuntimeError(f"load processes gave no result within {wait_s:g} s")
