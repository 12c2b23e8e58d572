"""The slots of one gateway process's job runs: at most ``concurrency`` jobs running or being
read at once, within the predict path's in-flight bound, handed out first come first served
among the deployments' readers so that no deployment's jobs starve for another's; and the
rows those runs may have with the models at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

READ_MAX = 16
"""Most jobs one read takes."""


class InFlight(Protocol):
    """What the slots read of the prediction service: its in-flight count and bound."""

    in_flight: int
    max_in_flight: int


class RowBudget:
    """Rows of jobs this process has with the models at once, granted in the order asked.

    A job's weight is its rows: sixty-four jobs of 1,000 rows in flight put seconds of work
    in front of the models, so that every realtime request behind them missed its timeout
    (found with a burst of such jobs: nearly all ended in 504). A job of more rows than the
    budget runs alone. The order is strict, so a large job is not passed for ever by small
    ones."""

    def __init__(self, rows: int):
        self.capacity = rows
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def full(self) -> bool:
        """Nothing more fits now, or someone waits: reading more jobs would only queue them."""
        return bool(self._waiting) or self.used >= self.capacity

    @contextlib.asynccontextmanager
    async def held(self, rows: int) -> AsyncIterator[None]:
        """Hold ``rows`` of the budget (at most all of it) for the body of the ``with``."""
        weight = min(max(rows, 1), self.capacity)
        if self._waiting or self.used + weight > self.capacity:
            granted = asyncio.get_running_loop().create_future()
            turn = (weight, granted)
            self._waiting.append(turn)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._give_back(weight)  # granted as it was cancelled
                else:
                    with contextlib.suppress(ValueError):  # dropped by a grant already
                        self._waiting.remove(turn)
                    self._grant()  # the next in line may fit now
                raise
        else:
            self.used += weight
        try:
            yield
        finally:
            self._give_back(weight)

    def _give_back(self, weight: int) -> None:
        self.used -= weight
        self._grant()

    def _grant(self) -> None:
        """Grant the waiters in order while they fit. A waiter cancelled but not yet woken
        (a stop cancels every run at once) is dropped: granting it raised InvalidStateError in
        the run giving rows back, whose job then ended failed with a 500 instead of being
        handed back (a helper's faults probe)."""
        while self._waiting:
            weight, granted = self._waiting[0]
            if granted.done():  # cancelled: its waiter is leaving
                self._waiting.popleft()
                continue
            if self.used + weight > self.capacity:
                return
            self._waiting.popleft()
            self.used += weight
            granted.set_result(None)


class JobSlots:
    """A slot is taken by a read (for each job it may return) and passes to the job's run."""

    def __init__(self, concurrency: int, service: InFlight, rows: int):
        self.concurrency = concurrency
        self.service = service
        self.rows = RowBudget(rows)
        """The rows the runs may have with the models at once: while it is full, no more
        jobs are read (a job read and left waiting could be claimed by another gateway)."""
        self.taken = 0
        """Slots held: jobs running here and reads in progress, at most ``concurrency``."""
        self.reading = 0
        """Of those, the slots of reads in progress (not yet predicts in flight)."""
        self._freed = asyncio.Event()
        self._queue: list[object] = []
        """Readers waiting for a slot, in the order they asked: one that just gave its slots
        back queues behind them."""

    @property
    def contended(self) -> bool:
        """Another reader waits: a read holding slots should not block long."""
        return bool(self._queue)

    def room(self) -> int:
        """Slots a read may take now: within ``concurrency`` and the in-flight bound, and none
        while the row budget is full."""
        if self.rows.full:
            return 0
        in_flight_room = self.service.max_in_flight - self.service.in_flight - self.reading
        return min(self.concurrency - self.taken, in_flight_room)

    async def reserve(self, *, readers: int, idle: bool) -> int:
        """Slots for one read, in turn: the reader's fair share of ``concurrency`` among
        ``readers``, or one for a reader whose stream was idle at its last read (slots held by
        blocking reads of idle streams are slots the busy ones lack)."""
        if self._queue or self.room() <= 0:
            turn = object()
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or self.room() <= 0:
                    self._freed.clear()
                    with contextlib.suppress(TimeoutError):  # predicts also end on their own
                        await asyncio.wait_for(self._freed.wait(), 0.05)
            finally:
                self._queue.remove(turn)
                self._freed.set()  # the next in line may have room too
        fair = 1 if idle else max(1, self.concurrency // max(1, readers))
        n = min(self.room(), READ_MAX, fair)
        self.taken += n
        self.reading += n
        return n

    def to_run(self) -> None:
        """One slot of a read now belongs to the run of a job it returned."""
        self.reading -= 1

    def release(self, n: int, *, reading: bool) -> None:
        self.taken -= n
        if reading:
            self.reading -= n
        self._freed.set()
