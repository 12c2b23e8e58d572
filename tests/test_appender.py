"""The gateway's XADD coalescing (rendezvous.bus.appender) against a real Redis server."""

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from rendezvous.bus.appender import AlreadyTaken, Fate, NotReplicated, StreamAppender, drops_log
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import connect_async
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import EmbeddedRedis, free_port
from rendezvous.retry_log import OncePerSpell


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


async def test_an_owner_finds_its_own_key_free_and_everyone_else_taken(
    r: redis.Redis, redis_url: str
) -> None:
    """An async job tried again after a slow Redis failed it for a moment released its id and
    raced its earlier try's append still under way: the late append took the id and the job
    failed 409 on its own request id (found by a probe). The job's id now owns the key."""
    appender = StreamAppender(_router(redis_url))
    errors: list[Exception] = []
    try:
        for owner in ("job-1", "job-1", "job-2", ""):
            appender.append_nowait("rdv:{d}:in", {b"f": owner.encode()}, on_error=errors.append,
                                   unique=("rdv:{d}:rid:y", 5000), unique_owner=owner)  # fmt: skip
        await appender.close()
        assert [f[b"f"] for _, f in r.xrange("rdv:{d}:in")] == [b"job-1", b"job-1"]
        assert [type(e) for e in errors] == [AlreadyTaken, AlreadyTaken]
        assert r.get("rdv:{d}:rid:y") == b"job-1"
        r.set("rdv:{d}:rid:z", "1")  # a predict's (no owner) is nobody's to reuse
        appender.append_nowait("rdv:{d}:in", {b"f": b"z"}, on_error=errors.append,
                               unique=("rdv:{d}:rid:z", 5000), unique_owner="job-1")  # fmt: skip
        await appender.close()
        assert len(errors) == 3 and r.xlen("rdv:{d}:in") == 2
    finally:
        await appender.client.close()


async def test_replicated_appends_wait_for_their_replicas_or_say_they_did_not(
    r: redis.Redis, redis_url: str, rc: redis.RedisCluster, redis_cluster: LocalCluster
) -> None:
    """WAIT rides at the end of the batch on the connection that wrote: on the cluster (one
    replica a master) the append is confirmed; on the single node (no replica) it is not."""
    cluster_router = Router(await connect_async(redis_cluster.url), timeout_s=2.0)
    appender = StreamAppender(cluster_router, wait_replicas=1, wait_timeout_ms=500)
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in range(3)]
    for i, fut in enumerate(done):
        appender.append_nowait(f"rdv:{{p{i}}}:in", {b"f": b"v"}, replicated=fut)
    await appender.close()
    assert [f.result() for f in done] == [None, None, None]
    assert all(rc.xlen(f"rdv:{{p{i}}}:in") == 1 for i in range(3))
    await cluster_router.close()
    await cluster_router.client.aclose()

    single = StreamAppender(_router(redis_url), wait_replicas=1, wait_timeout_ms=50)
    fut = loop.create_future()
    single.append_nowait("s", {b"f": b"v"}, replicated=fut)
    await single.close()
    assert isinstance(fut.exception(), NotReplicated) and r.xlen("s") == 1
    assert "0 acknowledged" in str(fut.exception())
    await single.client.close()


async def test_an_entry_is_lost_when_gone_other_than_by_trimming(
    r: redis.Redis, redis_url: str, rc: redis.RedisCluster, redis_cluster: LocalCluster
) -> None:
    """``fate`` on both kinds of Redis: the appended entry's id comes back through
    ``on_appended``; present, or trimmed away with everything before it, it is kept; missing
    behind an older entry, or past the stream's last id, or with its stream, it is gone, and
    a unique key released is free again."""
    for router, direct in ((_router(redis_url), r), (Router(await connect_async(
            redis_cluster.url), timeout_s=2.0), rc)):  # fmt: skip
        appender = StreamAppender(router)
        stream = "rdv:{lost}:in"
        direct.delete(stream)
        ids: list[bytes] = []
        for i in range(3):
            appender.append_nowait(stream, {b"i": b"%d" % i}, on_appended=ids.append)
        await appender.close()
        assert [e for e, _ in direct.xrange(stream)] == ids
        first, middle, last = ids
        assert await appender.fate(stream, middle) is Fate.KEPT
        direct.xdel(stream, middle)
        assert await appender.fate(stream, middle) is Fate.GONE  # an older one is still there
        direct.xtrim(stream, minid=last)
        assert await appender.fate(stream, first) is Fate.KEPT  # trimmed: the readers had it
        later = b"%d-0" % (int(last.split(b"-")[0]) + 1)
        assert await appender.fate(stream, later) is Fate.GONE
        direct.delete(stream)
        assert await appender.fate(stream, last) is Fate.GONE
        key = "rdv:{lost}:rid:taken"
        direct.set(key, "1")
        assert await appender.release(key) and not direct.exists(key)
        await router.close()
        await router.client.aclose()


async def test_a_redis_that_cannot_answer_leaves_an_entrys_fate_unknown() -> None:
    """Nothing listens where the appender looks: the entry's fate cannot be told (the gateway
    then blames Redis, not the models), and a key cannot be released."""
    router = _router(f"redis://127.0.0.1:{free_port()}")
    appender = StreamAppender(router)
    assert await appender.fate("rdv:{gone}:in", b"1-0") is Fate.UNKNOWN
    assert not await appender.release("rdv:{gone}:rid:x")
    await router.close()
    await router.client.aclose()


async def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not so after {timeout_s}s: {what}"
        await asyncio.sleep(0.02)


async def test_an_append_nobody_waits_for_is_tried_again_while_redis_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision records (no ``on_error``) appended while Redis restarts are held and written
    once it is back, in order; past ``retry_s`` they are dropped and counted, and said once a
    spell (a stall said each expiring batch, every ~2 s)."""
    drops_filter = next(f for f in drops_log.filters if isinstance(f, OncePerSpell))
    drops_filter.reset()
    caplog.set_level(logging.WARNING, logger=drops_log.name)
    server = EmbeddedRedis(tmp_path / "redis").start()
    direct = redis.Redis.from_url(server.url)
    router = _router(server.url)
    try:
        patient, hasty = StreamAppender(router), StreamAppender(router, retry_s=0.0)
        stream = "rdv:{held}:decisions"
        server.stop()
        for i in range(3):
            patient.append_nowait(stream, {b"i": b"%d" % i}, urgent=False)
        hasty.append_nowait(stream, {b"i": b"hasty"})
        await _until(lambda: patient.held == 3 and hasty.dropped == 1, 10, "both failed")
        for i in range(5):  # more drops in the spell: counted, not each a line
            hasty.append_nowait(stream, {b"i": b"hasty%d" % i})
            await _until(lambda n=i: hasty.dropped == n + 2, 10, "dropped")
        lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(lines) == 1 and "(1 so far)" in lines[0], lines
        await asyncio.sleep(0.6)  # tried again meanwhile, in vain: still held
        assert patient.held == 3 and patient.round_trips >= 3
        server.start()
        await _until(lambda: direct.xlen(stream) == 3, 10, "the held appends written")
        assert [f[b"i"] for _, f in direct.xrange(stream)] == [b"0", b"1", b"2"]
        assert patient.held == 0 and patient.dropped == 0 and hasty.held == 0
        await patient.close()
    finally:
        direct.close()
        await router.close()
        await router.client.aclose()
        server.stop()
