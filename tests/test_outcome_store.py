"""The outcome store on a real Redis (single node and cluster): outcomes filed in time buckets
with their expiry, found in one script over every live bucket, and the byte bound that drops
the oldest buckets; the bytes a request costs, measured."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.dataplane.outcome_store import PARTS, UNWRITTEN_S, OutcomeStore
from rendezvous import names
from rendezvous.bus.connection import AsyncClient, connect_async
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.outcomes import Outcome

DEP = "outcomes-test"


def _record(ts_ms: float, p1: float = 0.987655) -> DecisionRecord:
    outputs = {
        "real": BinOutput("breast-cancer-clf", 2, 0.1, 0.2, 1.5, [1], [[1 - p1, p1]]),
        "canary": BinOutput("breast-cancer-clf", 1, 0.1, 0.2, 1.7, [0], [[0.6, 0.4]]),
        "broken": BinOutput("other", 1, 0.1, 0.2, 1.7, error="boom"),
    }
    return DecisionRecord(secrets.token_hex(16), DEP, ts_ms, "real", "real", 2.0, outputs, (), {})


async def _file(store: OutcomeStore, records: list[DecisionRecord]) -> int:
    """Queue the records' outcomes as a gateway process does, and write them."""
    for rec in records:
        store.observe(rec)
    return await store.flush()


@pytest.fixture
async def client(bus_url: str) -> AsyncIterator[AsyncClient]:
    c = await connect_async(bus_url)
    keys = [k async for k in c.scan_iter(match=f"rdv:{{{DEP}}}:*")]
    for key in keys:
        await c.delete(key)
    yield c
    await c.aclose()


async def test_outcomes_are_bucketed_expire_and_are_found_in_one_round_trip(
    client: AsyncClient,
) -> None:
    store = OutcomeStore(client, retention_s=600, bucket_s=60, max_bytes=10**9)
    now = time.time() * 1000
    records = [_record(now - age_s * 1000) for age_s in (0, 0, 130, 400)]
    assert await _file(store, records) == 4
    ids = [rec.request_id for rec in records]
    found = await store.find(DEP, [*ids, "unknown-id"])
    assert set(found) == set(ids)
    for rec in records:
        bucket, blob = found[rec.request_id]
        assert bucket == store.bucket_of(rec.ts_ms) * PARTS  # its time bucket's first part
        outcome = Outcome.decode(blob)
        assert set(outcome.answers) == {"real", "canary"}  # the failed bin is not kept
        assert outcome.answers["real"].labels == [1] and outcome.chosen_role == "real"
        assert outcome.answers["real"].probabilities[0][1] == pytest.approx(0.987655, abs=1e-7)
        ttl = await client.ttl(names.outcomes_key(DEP, bucket))
        assert 600 < ttl <= store.ttl_s


async def test_an_outcome_past_the_retention_is_not_found(client: AsyncClient) -> None:
    """An expired request id: an outcome older than the retention is not found (the feedback
    route's 404), even while its bucket is still in Redis (written under a longer retention)."""
    now = time.time() * 1000
    expired, kept = _record(now - 700_000), _record(now - 500_000)
    writer = OutcomeStore(client, retention_s=3600, bucket_s=60, max_bytes=10**9)
    await _file(writer, [expired, kept])
    ids = [expired.request_id, kept.request_id]
    assert set(await writer.find(DEP, ids)) == set(ids)
    reader = OutcomeStore(client, retention_s=600, bucket_s=60, max_bytes=10**9)
    assert set(await reader.find(DEP, ids)) == {kept.request_id}


async def test_the_byte_bound_drops_the_oldest_buckets(client: AsyncClient) -> None:
    now = time.time() * 1000
    per_bucket = 200
    store = OutcomeStore(client, retention_s=3600, bucket_s=60, max_bytes=10**9)
    oldest = [_record(now - 5 * 60_000) for _ in range(per_bucket)]
    await _file(store, oldest)
    state = await client.hgetall(names.outcomes_state_key(DEP))
    one_bucket = int(next(iter(state.values())))
    bucket = store.bucket_of(oldest[0].ts_ms) * PARTS
    memory = await client.memory_usage(names.outcomes_key(DEP, bucket), samples=0)
    assert 0.8 < one_bucket / memory < 1.2, "the byte count should follow Redis's own figure"
    assert one_bucket / per_bucket < 250, "about 190 bytes a request (README)"

    store.max_bytes = int(2.5 * one_bucket)
    newer = {age: [_record(now - age * 60_000) for _ in range(per_bucket)] for age in (3, 2, 0)}
    for age in (3, 2, 0):
        await _file(store, newer[age])
    assert await store.find(DEP, [r.request_id for r in oldest]) == {}
    kept = await store.find(DEP, [r.request_id for r in newer[0] + newer[2]])
    assert len(kept) == 2 * per_bucket
    sizes = await client.hgetall(names.outcomes_state_key(DEP))
    assert sum(int(v) for v in sizes.values()) <= store.max_bytes
    assert store.pruned_buckets == 2


async def test_a_busy_hour_is_bounded_too_by_dropping_its_oldest_parts(
    client: AsyncClient,
) -> None:
    """Every outcome in one time bucket (an hour by default) and far more of them than the
    bound: the bucket goes on in parts, the oldest parts are dropped, Redis's figure for the
    deployment's outcomes stays near the bound, and the latest requests are still found."""
    store = OutcomeStore(client, retention_s=3600, bucket_s=3600, max_bytes=10**9)
    now = time.time() * 1000
    probe = [_record(now) for _ in range(100)]
    await _file(store, probe)
    per_request = sum(int(v) for v in (await client.hgetall(
        names.outcomes_state_key(DEP))).values()) / len(probe)  # fmt: skip
    store.max_bytes = int(per_request * 1000)  # room for about 1,000 requests
    flushes = [[_record(now) for _ in range(200)] for _ in range(20)]  # 4,000 more
    for batch in flushes:
        await _file(store, batch)
    state = await client.hgetall(names.outcomes_state_key(DEP))
    sizes = {int(k[2:]): int(v) for k, v in state.items() if k.startswith(b"b:")}
    assert len({b // PARTS for b in sizes}) == 1 and len(sizes) > 1  # one hour, in parts
    assert sum(sizes.values()) <= store.max_bytes + store.part_bytes + 200 * per_request
    memory = 0
    for bucket in sizes:
        memory += await client.memory_usage(names.outcomes_key(DEP, bucket), samples=0) or 0
    assert memory < 1.3 * (store.max_bytes + store.part_bytes + 200 * per_request)
    assert store.pruned_buckets > 0
    assert await store.find(DEP, [r.request_id for r in probe + flushes[0]]) == {}
    latest = [r.request_id for r in flushes[-1]]
    assert set(await store.find(DEP, latest)) == set(latest)
    assert set(await store.find(DEP, latest, within_s=1)) == set(latest)


async def test_a_lookup_of_more_ids_than_lua_unpacks_at_once(client: AsyncClient) -> None:
    store = OutcomeStore(client, retention_s=600, bucket_s=60, max_bytes=10**9)
    now = time.time() * 1000
    records = [_record(now) for _ in range(2500)]
    await _file(store, records)
    ids = [f"unknown-{i}" for i in range(2500)] + [r.request_id for r in records]
    found = await store.find(DEP, ids)
    assert set(found) == {r.request_id for r in records}


async def test_outcomes_redis_did_not_take_are_written_by_a_later_flush(tmp_path: Path) -> None:
    """A flush while Redis restarts fails and keeps its outcomes (but those past
    ``UNWRITTEN_S``); the next flush, once Redis is back, writes them with the new ones."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    own = await connect_async(server.url, timeout_s=1.0)
    try:
        store = OutcomeStore(own, retention_s=600, bucket_s=60, max_bytes=10**9)
        now = time.time() * 1000
        waiting = [_record(now), _record(now - 1000)]
        stale = _record(now - (UNWRITTEN_S + 5) * 1000)
        server.stop()
        with pytest.raises(REDIS_FAILURES):
            await _file(store, [*waiting, stale])
        server.start()
        later = _record(time.time() * 1000)
        assert await _file(store, [later]) == 3
        found = await store.find(DEP, [r.request_id for r in [*waiting, stale, later]])
        assert set(found) == {r.request_id for r in [*waiting, later]}
        assert await store.flush() == 0  # nothing is written twice
    finally:
        await own.aclose()
        server.stop()


async def test_an_outage_that_goes_on_is_not_said_over_once_its_held_outcomes_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush loop said "working again" once the outcomes an outage held were dropped (past
    ``UNWRITTEN_S``, 30 s) and a flush found nothing to write, while Redis was still down (a
    helper's probe: 45 s before it came back). Only a write says it works again."""
    import gateway.dataplane.outcome_store as outcome_store

    monkeypatch.setattr(outcome_store, "UNWRITTEN_S", 0.2)
    server = EmbeddedRedis(tmp_path / "redis").start()
    own = await connect_async(server.url, timeout_s=0.5)
    caplog.set_level("INFO", logger="gateway.dataplane.outcome_store")
    store = OutcomeStore(own, retention_s=600, bucket_s=60, max_bytes=10**9, flush_s=0.05)
    loop = asyncio.create_task(store.run())
    try:
        server.stop()
        store.observe(_record(time.time() * 1000))
        await asyncio.sleep(1.5)  # held, dropped past UNWRITTEN_S; Redis still down
        said = [r.getMessage() for r in caplog.records]
        assert any("dropped unwritten" in m for m in said), said
        assert not any("working again" in m for m in said), said
        server.start()
        store.observe(_record(time.time() * 1000))
        await asyncio.sleep(1.0)
        assert any("working again" in r.getMessage() for r in caplog.records)
    finally:
        loop.cancel()
        await own.aclose()
        server.stop()
