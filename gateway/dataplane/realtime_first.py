"""Realtime predicts first: the long steps of async jobs take turns at the event loop between
them.

One event loop serves a gateway process's realtime predicts and its share of the async jobs.
A job's long steps do not yield: checking a 1,000-row body (at submission and again at its
run), shaping its answer's rows and writing its decision record each take milliseconds on a
loaded host. A realtime predict passes through the loop several times (its body, its input's
write, its answer's arrival, its response), and each pass waited for whatever job steps were
ready: with ten clients submitting 1,000-row jobs on the 2-core machine, realtime p50 went from
4 to 70-191 ms (p99 153-349 ms; 21-26 and 62-111 with the turns). Here a job's long step waits
its turn, first come first served and one at a time, and it starts once no realtime predict is
in flight in this process, or after ``YIELD_RATIO`` times the last job step's length
(``YIELD_S`` at most, ``RDV_JOB_YIELD_MS``; 0: jobs never wait) at the latest: sustained
realtime traffic leaves the jobs about a tenth of the loop, and a job's small steps hardly
wait."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

YIELD_RATIO = 10.0
"""A job step waits for the realtime predicts in flight at most this many times the last job
step's length."""
YIELD_S = 0.05
"""And never longer than this (``RDV_JOB_YIELD_MS``'s default)."""


class RealtimeFirst:
    """Counts the realtime predicts in flight and hands out the job steps' turns."""

    def __init__(self, yield_ratio: float = YIELD_RATIO, yield_s: float = YIELD_S) -> None:
        self.yield_ratio = yield_ratio
        self.yield_s = yield_s
        self.in_flight = 0
        """Predicts a caller waits on, in flight in this process (not async jobs' runs)."""
        self._lull: set[asyncio.Future[None]] = set()
        self._held = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._last_step_s = 0.0

    def started(self) -> None:
        self.in_flight += 1

    def ended(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._lull:
            for waiter in self._lull:
                if not waiter.done():
                    waiter.set_result(None)
            self._lull.clear()

    async def lull(self, within_s: float) -> None:
        """Return once no realtime predict is in flight, or after ``within_s`` at the latest."""
        if not self.in_flight or within_s <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._lull.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, within_s)
        finally:
            self._lull.discard(waiter)

    async def turn(self) -> None:
        """Return when a job's long step may run: after the steps that asked before it, once
        realtime work had its lull. The step must follow without an ``await``: the turn passes
        on at the loop's next turn, which also measures how long the step took."""
        if self._held or self._waiting:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._pass_on()  # granted as it was cancelled: the next one's turn
                else:
                    self._waiting.remove(granted)
                raise
        else:
            self._held = True
        try:
            await self.lull(min(self._last_step_s * self.yield_ratio, self.yield_s))
        except BaseException:
            self._pass_on()
            raise
        asyncio.get_running_loop().call_soon(self._step_ended, time.perf_counter())

    def _step_ended(self, started: float) -> None:
        self._last_step_s = time.perf_counter() - started
        self._pass_on()

    def _pass_on(self) -> None:
        """The holder's step ended: the next in line goes (in a later turn of the loop)."""
        while self._waiting:
            granted = self._waiting.popleft()
            if not granted.done():
                granted.set_result(None)
                return
        self._held = False


__all__ = ["YIELD_RATIO", "YIELD_S", "RealtimeFirst"]
