"""The gateway's asyncio Redis client bounds its connections and makes a command past the
bound wait, on a real single node and a real cluster: redis-py's default pool failed at once
past 100 connections (and its cluster client always does past its bound)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
import redis

from rendezvous.bus.connection import connect_async
from rendezvous.bus.waiting_cluster import Turns

pytestmark = pytest.mark.integration


async def test_a_burst_far_past_the_bound_waits_and_is_served(bus_url: str) -> None:
    client = await connect_async(bus_url, timeout_s=5.0, max_connections=8)
    try:
        await client.set("{turns}k", "v")

        async def piped() -> list[object]:
            pipe = client.pipeline(transaction=False)
            pipe.get("{turns}k")
            pipe.exists("{turns}k")
            return await pipe.execute()  # type: ignore[no-any-return]

        got = await asyncio.gather(
            *(client.get("{turns}k") for _ in range(400)), *(piped() for _ in range(100))
        )
        assert got == [b"v"] * 400 + [[b"v", 1]] * 100
    finally:
        await client.delete("{turns}k")
        await client.aclose()


async def test_a_turn_not_free_in_time_is_a_redis_connection_error_that_names_the_bound() -> None:
    turns = Turns(1, 0.05)
    async with turns.turn():
        async with turns.turn():  # the same task, inside its own turn: no second turn
            pass

        async def other() -> None:
            async with turns.turn():
                pass

        with pytest.raises(redis.ConnectionError, match="RDV_REDIS_MAX_CONNECTIONS"):
            await asyncio.create_task(other(), context=contextvars.Context())  # another caller's
