"""The backlog bound's 503 names the reader that holds the input stream (``gateway.dataplane.
backlog``), from what the deployments refresh read, and its spell is logged once (a helper's
probe: "N entries not yet consumed by every reader", nothing logged, ``/readyz`` ready)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

import pytest
import redis

from gateway.dataplane.backlog import slowest_reader
from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import Backlogged
from gateway.dataplane.service import PredictionService
from gateway.transport.readiness import readiness
from processes import flush
from rendezvous import names
from rendezvous.bus.connection import Client, connect, connect_async

DEP = "held"


def _stream(r: Client, entries: int, behind: str) -> str:
    """An input stream of ``entries`` entries read by every group but ``behind``."""
    stream = names.input_stream(DEP)
    groups = (names.LOGBIN_GROUP, names.model_group("real"), names.model_group("canary"))
    for group in groups:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(stream, {"i": i})
    pipe.execute()
    for group in groups:
        if group != behind:
            r.xreadgroup(group, "c-1", {stream: ">"}, count=entries)  # read: pending
    r.sadd(names.DEPLOYMENTS_SET, DEP)
    return stream


async def _service(redis_url: str) -> tuple[DeploymentCache, PredictionService, Any]:
    client = await connect_async(redis_url, timeout_s=2.0)
    cache = DeploymentCache(client)
    service = PredictionService(cache, cast(Any, None), cast(Any, None), max_rows=8,
                                max_in_flight=4, max_backlog=100)  # fmt: skip
    return cache, service, client


async def test_the_backlogs_503_names_the_log_bin_and_its_failure_and_logs_the_spell_once(
    r: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream = _stream(r, 150, names.LOGBIN_GROUP)
    r.hset(names.LOGBIN_STATS, "lb-1", json.dumps({"ts": time.time(), "failing": "disk full"}))
    cache, service, client = await _service(redis_url)
    try:
        await cache.refresh()  # the backlog, past half the bound: who holds it is read next
        await cache.refresh()
        caplog.set_level(logging.INFO, logger="gateway.dataplane.backlog_bound")
        for _ in range(50):
            with pytest.raises(Backlogged) as refused:
                service.check_room(DEP)
        detail = str(refused.value)
        assert "150 entries" in detail, detail
        assert "the log bin (consumer group 'logbin')" in detail, detail
        assert "disk full" in detail, detail
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 1, lines
        assert "RDV_MAX_BACKLOG=100" in lines[0] and "log bin" in lines[0], lines
        assert "disk full" in lines[0] and caplog.records[0].levelno == logging.WARNING
        # /readyz says it, still ready (every gateway shares the backlog): what app.py passes.
        r.zadd(names.workers_key(DEP), {"real|w-1": time.time()})
        refused_now = service.backlog.refusal(DEP)
        assert refused_now is not None
        refusing = {DEP: refused_now[1]}
        status, doc, _ = await readiness(client, [DEP], 5.0, None, backlogged=refusing)
        assert status == 200 and doc["deployments"][DEP]["backlog"] == detail, doc
        # The log bin reads and acks, the stream is trimmed: taken again, and said so.
        r.xreadgroup(names.LOGBIN_GROUP, "lb-1", {stream: ">"}, count=200)
        r.xtrim(stream, maxlen=0)
        await cache.refresh()
        service.check_room(DEP)
        await cache.refresh()
        assert DEP not in cache.behind, "not read once the backlog is short"
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 2 and "working again" in lines[1] and "50 failed" in lines[1], lines
    finally:
        await client.aclose()


async def test_a_model_role_behind_is_named_with_its_live_workers(bus_url: str) -> None:
    """On a cluster too: the log bins' counters live on another node than the deployment."""
    r = connect(bus_url)
    flush(r)
    _stream(r, 120, names.model_group("canary"))
    r.zadd(names.workers_key(DEP), {"real|w-1": time.time()})  # real lives; no canary worker
    r.hset(names.LOGBIN_STATS, "lb-1", json.dumps({"ts": time.time(), "failing": ""}))
    cache, service, client = await _service(bus_url)
    try:
        await cache.refresh()
        await cache.refresh()
        with pytest.raises(Backlogged) as refused:
            service.check_room(DEP)
        detail = str(refused.value)
        assert "the canary role's workers (consumer group 'model:canary')" in detail, detail
        assert "0 live workers" in detail and "no live worker" in detail, detail
    finally:
        await client.aclose()
        r.close()


def test_the_slowest_reader_from_the_groups_read() -> None:
    """The lowest last delivered id across partitions; the log bin's counters say why."""
    now = 1_000_000.0
    groups = [
        [{"name": "logbin", "pending": 3, "last-delivered-id": b"900-0"},
         {"name": "model:real", "pending": 0, "last-delivered-id": b"950-0"}],
        [{"name": "logbin", "pending": 2, "last-delivered-id": b"990-0"},
         {"name": "model:real", "pending": 0, "last-delivered-id": b"800-0"}],
    ]  # fmt: skip
    behind = slowest_reader(groups, [b"real|w-1"], {}, now)
    assert behind is not None and "model:real" in behind.who and "1 live worker" in behind.detail
    groups[1][1]["last-delivered-id"] = b"999-0"
    quiet = {b"lb-1": json.dumps({"ts": now - 30, "failing": ""}).encode()}
    behind = slowest_reader(groups, [], quiet, now)
    assert behind is not None and "log bin" in behind.who
    assert "5 read and not acked" in behind.detail and "30 s ago" in behind.detail
    assert "30 s" not in behind.who, "the log line's words stay the same while it lasts"
    behind = slowest_reader(groups, [], {}, now)
    assert behind is not None and "no log bin has published" in behind.who
    assert slowest_reader([redis.ResponseError("no such key")], [], {}, now) is None
