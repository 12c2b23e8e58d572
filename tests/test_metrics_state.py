"""The scrape-time view of the other processes (gateway.observability.metrics_state) against a
real Redis.
Apart from tests/test_observability.py: that module's running system must not see its
database flushed."""

from __future__ import annotations

import json
import time

import redis

from rendezvous import names


async def test_counters_of_dead_processes_are_hidden_then_forgotten(
    r: redis.Redis, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    from gateway.observability.metrics_state import FORGET_STATS_S, STALE_STATS_S, read_state

    now = time.time()
    key = names.stats_key("dep")
    r.delete(key, names.LOGBIN_STATS)
    r.hset(key, mapping={
        "real|alive": json.dumps({"ts": now, "scored": 5}),
        "real|stalled": json.dumps({"ts": now - STALE_STATS_S - 5, "scored": 7}),
        "real|long-dead": json.dumps({"ts": now - FORGET_STATS_S - 5, "scored": 9}),
        "real|garbage": b"\xff not json",
    })  # fmt: skip
    r.hset(names.LOGBIN_STATS, "logbin-old", json.dumps({"ts": now - FORGET_STATS_S - 5}))
    client = aioredis.Redis.from_url(redis_url)
    try:
        state = await read_state(client, ["dep"], heartbeat_timeout_s=10)
    finally:
        await client.aclose()
    assert set(state.deployments["dep"].worker_stats) == {"real|alive"}
    assert state.logbin_stats == {}
    # The stalled one may come back and republish; the long-dead and unreadable are deleted.
    assert set(r.hkeys(key)) == {b"real|alive", b"real|stalled"}
    assert not r.exists(names.LOGBIN_STATS)
