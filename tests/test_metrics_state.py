"""The scrape-time view of the other processes (gateway.observability.metrics_state) against a
real Redis.
Apart from tests/test_observability.py: that module's running system must not see its
database flushed."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from rendezvous import names


async def scraped(redis_url: str) -> tuple[Any, dict[str, Any]]:
    """What a scrape reads of deployment ``dep``: the snapshot, and its families by name."""
    import redis.asyncio as aioredis

    from gateway.observability.cluster_state import read_state
    from gateway.observability.metrics_state import ClusterStateCollector

    client = aioredis.Redis.from_url(redis_url)
    try:
        state = await read_state(client, ["dep"], heartbeat_timeout_s=10)
    finally:
        await client.aclose()
    return state, {f.name: f for f in ClusterStateCollector(state).collect()}


async def test_counters_of_dead_processes_are_hidden_then_forgotten(
    r: redis.Redis, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    from gateway.observability.cluster_state import FORGET_STATS_S, STALE_STATS_S, read_state

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


async def test_a_role_whose_workers_all_died_reads_0_live_workers(
    r: redis.Redis, redis_url: str
) -> None:
    """Found by hand: a stopped canary's series vanished, so ``rdv_live_workers == 0`` could
    never fire. Every role with a group on the input stream is shown, 0 where none is live."""
    stream, workers = names.input_stream("dep"), names.workers_key("dep")
    r.delete(stream, workers)
    for role in ("real", "canary"):
        r.xgroup_create(stream, names.model_group(role), "$", mkstream=True)
    r.xgroup_create(stream, names.LOGBIN_GROUP, "$")
    r.zadd(workers, {"real|w1": time.time(), "canary|w2": time.time() - 60})
    _, families = await scraped(redis_url)
    live = {s.labels["role"]: s.value for s in families["rdv_live_workers"].samples}
    assert live == {"real": 1, "canary": 0}
    # and a role's skipped entries read 0 before its first skip, which increase() then sees
    skipped = {s.labels["role"]: s.value for s in families["rdv_role_skipped_entries"].samples}
    assert skipped == {"real": 0, "canary": 0}


async def test_how_long_the_oldest_undelivered_entry_waited_reads_on_every_redis(
    r: redis.Redis, redis_url: str
) -> None:
    """``rdv_stream_group_lag`` counts entries on Redis 7 only (XINFO GROUPS 'lag'): on the
    6.2 that ``rdv serve`` embeds the dashboard's lag panel was empty. The wait of the oldest
    entry a group has not been delivered reads on both: from the stream's first entry when a
    group is behind all of it, else from the entry after its last delivered one."""
    stream = names.input_stream("dep")
    r.delete(stream)
    now_ms = int(time.time() * 1000)
    ids = [f"{now_ms - 40_000}-0", f"{now_ms - 30_000}-0", f"{now_ms - 1}-0"]
    for entry_id in ids:
        r.xadd(stream, {b"e": b"1"}, id=entry_id)
    r.xgroup_create(stream, names.LOGBIN_GROUP, "0")  # behind all of it
    r.xgroup_create(stream, names.model_group("real"), "$")  # has it all
    r.xgroup_create(stream, names.model_group("canary"), "0")
    r.xreadgroup(names.model_group("canary"), "c", {stream: ">"}, count=1)  # the first only
    state, families = await scraped(redis_url)
    waited = {s.labels["group"]: s.value for s in families["rdv_stream_group_lag_seconds"].samples}
    assert 40 <= waited[names.LOGBIN_GROUP] < 45, waited
    assert 30 <= waited[names.model_group("canary")] < 35, waited
    assert waited[names.model_group("real")] == 0, waited
    assert state.deployments["dep"].input_length == 3
