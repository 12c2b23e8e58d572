"""The gateway's XADD coalescing (rendezvous.bus.appender) against a real Redis server."""

import asyncio

import redis
import redis.asyncio as aioredis

from rendezvous.bus.appender import AlreadyTaken, StreamAppender
from rendezvous.bus.routing import Router


def _router(url: str) -> Router:
    return Router(aioredis.Redis.from_url(url), timeout_s=2.0)


async def test_concurrent_appends_share_round_trips_and_lazy_ones_wait_for_company(
    r: redis.Redis, redis_url: str
) -> None:
    appender = StreamAppender(_router(redis_url), linger_s=0.2)
    try:
        for i in range(20):
            appender.append_nowait("s", {b"i": b"%d" % i})
        await asyncio.sleep(0.05)
        assert r.xlen("s") == 20 and appender.round_trips <= 2
        # a lazy append waits (up to linger_s) and rides with the next urgent one
        before = appender.round_trips
        appender.append_nowait("lazy", {b"d": b"1"}, urgent=False)
        await asyncio.sleep(0.05)
        assert r.xlen("lazy") == 0
        appender.append_nowait("s", {b"i": b"urgent"})
        await asyncio.sleep(0.05)
        assert r.xlen("lazy") == 1 and appender.round_trips == before + 1
        # alone, it goes after linger_s
        appender.append_nowait("lazy", {b"d": b"2"}, urgent=False)
        await asyncio.sleep(0.3)
        assert r.xlen("lazy") == 2
        # and close() sends what still waits
        appender.append_nowait("lazy", {b"d": b"3"}, urgent=False)
        await appender.close()
        assert r.xlen("lazy") == 3
    finally:
        await appender.client.close()


async def test_failures_reach_their_handler_and_capped_streams_stay_capped(
    r: redis.Redis, redis_url: str
) -> None:
    r.set("not-a-stream", "x")
    appender = StreamAppender(_router(redis_url))
    errors: list[Exception] = []
    try:
        appender.append_nowait("not-a-stream", {b"f": b"v"}, on_error=errors.append)
        for i in range(3000):
            appender.append_nowait("capped", {b"i": b"%d" % i}, maxlen=100)
        await appender.close()
        assert len(errors) == 1 and "WRONGTYPE" in str(errors[0])
        assert 100 <= r.xlen("capped") < 3000  # MAXLEN ~: trimmed by whole nodes
    finally:
        await appender.client.close()


async def test_a_unique_append_takes_its_key_or_appends_nothing(
    r: redis.Redis, redis_url: str
) -> None:
    appender = StreamAppender(_router(redis_url))
    errors: list[Exception] = []
    try:
        for _ in range(3):
            appender.append_nowait("rdv:{d}:in", {b"f": b"v"}, on_error=errors.append,
                                   unique=("rdv:{d}:rid:x", 5000))  # fmt: skip
        await appender.close()
        assert r.xlen("rdv:{d}:in") == 1
        assert [type(e) for e in errors] == [AlreadyTaken, AlreadyTaken]
        assert 0 < r.pttl("rdv:{d}:rid:x") <= 5000
    finally:
        await appender.client.close()
