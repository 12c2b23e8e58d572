"""Realtime predicts first: the async jobs' long steps take turns between them, one at a time,
each after a lull in realtime work (bounded, so that jobs are never stopped), and a job's
decision record is written in a turn of its own (``test_matcher``)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from admin_support import AppClient
from pydantic import ValidationError

from gateway.dataplane.realtime_first import RealtimeFirst
from gateway.settings import Settings
from gateway.transport.app import create_app


def a_long_step(seconds: float) -> None:
    """What a job's long step is to the loop: time that does not yield."""
    time.sleep(seconds)


async def test_a_step_runs_at_once_when_nothing_else_waits() -> None:
    first = RealtimeFirst()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await first.turn()
    assert loop.time() - t0 < 0.01


async def test_steps_take_turns_in_order_one_per_turn_of_the_loop() -> None:
    first = RealtimeFirst()
    ran: list[int] = []
    turns: list[int] = []
    tick = 0

    async def ticker() -> None:
        nonlocal tick
        while True:
            tick += 1
            await asyncio.sleep(0)

    async def step(i: int) -> None:
        await first.turn()
        ran.append(i)
        turns.append(tick)

    clock = asyncio.create_task(ticker())
    await asyncio.gather(*(step(i) for i in range(5)))
    clock.cancel()
    assert ran == [0, 1, 2, 3, 4]
    assert all(b > a for a, b in itertools.pairwise(turns)), turns


async def test_a_step_waits_for_the_realtime_predicts_in_flight() -> None:
    first = RealtimeFirst(yield_ratio=1000.0, yield_s=5.0)
    await first.turn()
    a_long_step(0.02)  # a long step (it does not yield): the next may wait up to 5 s
    first.started()
    waiting = asyncio.create_task(first.turn())
    await asyncio.sleep(0.2)
    assert not waiting.done()  # a realtime predict is in flight
    first.ended()
    await asyncio.wait_for(waiting, 1.0)


async def test_a_step_waits_no_longer_than_its_bound_under_sustained_realtime_traffic() -> None:
    first = RealtimeFirst(yield_ratio=10.0, yield_s=0.1)
    first.started()  # and never ended: realtime traffic that never pauses
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await first.turn()  # no step before it: nothing to yield for
    assert loop.time() - t0 < 0.05
    a_long_step(0.05)  # a 50 ms step: ten times that is past the bound
    t0 = loop.time()
    await first.turn()
    assert 0.09 <= loop.time() - t0 < 1.0
    # A small step hardly waits: a job's small steps are not slowed as its large ones.
    await asyncio.sleep(0.01)
    t0 = loop.time()
    await first.turn()
    assert loop.time() - t0 < 0.05


async def test_with_no_yield_a_step_goes_while_realtime_is_in_flight() -> None:
    """``RDV_JOB_YIELD_MS=0``: jobs never wait for realtime work (they still go one at a
    time)."""
    first = RealtimeFirst(yield_s=0.0)
    await first.turn()
    a_long_step(0.02)
    first.started()  # and never ended
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await first.turn()
    assert loop.time() - t0 < 0.015


def test_the_gateway_takes_its_job_yield_from_the_settings(
    redis_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RDV_JOB_YIELD_MS", "7.5")
    settings = Settings(redis_url=redis_url, data_dir=data_dir)
    client = AppClient(create_app(settings))
    try:
        assert client.get("/healthz").status_code == 200
        assert client.app.state.service.realtime_first.yield_s == 0.0075
    finally:
        client.close()
    monkeypatch.setenv("RDV_JOB_YIELD_MS", "-1")
    with pytest.raises(ValidationError, match="job_yield_ms"):
        Settings(redis_url=redis_url, data_dir=data_dir)


async def test_a_cancelled_waiter_does_not_hold_up_the_others() -> None:
    first = RealtimeFirst(yield_ratio=1000.0, yield_s=5.0)
    await first.turn()
    a_long_step(0.02)
    first.started()
    holder = asyncio.create_task(first.turn())  # waits for the lull, holding the turn
    queued = asyncio.create_task(first.turn())
    behind = asyncio.create_task(first.turn())
    await asyncio.sleep(0.05)
    queued.cancel()
    holder.cancel()
    await asyncio.gather(holder, queued, return_exceptions=True)
    first.ended()
    await asyncio.wait_for(behind, 1.0)
    # Its lull timed out and the realtime predicts ended at once after: nothing breaks.
    first = RealtimeFirst(yield_ratio=1000.0, yield_s=0.01)
    first.started()
    await first.lull(0.01)
    first.ended()
    assert not first._lull
