"""``/readyz``'s judgement (``gateway.transport.readiness``) against real Redis: on one node,
and on the real cluster with one master not answering (SIGSTOP, shorter than the cluster's
node timeout, so no failover): what needs that node is unready, the rest is not held up, and
the archive's counters being away never makes the gateway unready."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import redis

from gateway.dataplane.matcher import Rendezvous
from gateway.transport.readiness import archive_status, readiness
from rendezvous import names
from rendezvous.bus.appender import StreamAppender
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import connect_async
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import EmbeddedRedis


def _live(r: redis.Redis | redis.RedisCluster, deployment: str, *roles: str) -> None:
    for role in roles:
        r.zadd(names.workers_key(deployment), {f"{role}|{role}-1": time.time()})


async def test_ready_needs_every_deployments_real_worker_and_this_gateways_replies(
    r: redis.Redis, redis_url: str
) -> None:
    client = await connect_async(redis_url, timeout_s=2.0)
    try:
        timeout_s = 5.0
        status, doc, _ = await readiness(client, [], timeout_s, None)
        assert status == 503 and doc["deployments"] == {}, "no deployment: nothing to serve"
        _live(r, "a", "real", "canary")
        _live(r, "b", "canary")
        status, doc, headers = await readiness(client, ["a", "b"], timeout_s, None)
        assert status == 503 and headers == {"Retry-After": "1"}
        assert doc["deployments"]["a"] == {"live_workers": {"real": 1, "canary": 1},
                                           "ready": True}  # fmt: skip
        assert doc["deployments"]["b"]["ready"] is False
        assert doc["archive"] == {"status": "no log bin"}
        _live(r, "b", "real")
        r.hset(names.LOGBIN_STATS, "lb-1", json.dumps({"ts": time.time(), "failing": "disk full"}))
        status, doc, headers = await readiness(client, ["a", "b"], timeout_s, None)
        assert status == 200 and doc["ready"] is True and headers is None
        assert doc["archive"] == {"status": "failing", "reason": "disk full"}, "said, still 200"
        # Every deployment served, but this process cannot read its replies: none of its
        # requests would be answered, so a load balancer must send them elsewhere.
        status, doc, headers = await readiness(client, ["a", "b"], timeout_s, "ConnectionError")
        assert status == 503 and doc["ready"] is False and headers == {"Retry-After": "1"}
        assert doc["replies"] == "this gateway's reply stream cannot be read: ConnectionError"
    finally:
        await client.aclose()


def test_the_archive_is_said_from_the_log_bins_fresh_counters() -> None:
    now = time.time()
    ok = json.dumps({"ts": now, "failing": ""}).encode()
    bad = json.dumps({"ts": now, "failing": "archive write failed: disk full"}).encode()
    stale = json.dumps({"ts": now - 3600, "failing": "long gone"}).encode()
    assert archive_status({b"a": ok}) == {"status": "ok"}
    assert archive_status({b"a": ok, b"b": bad}) == {
        "status": "failing", "reason": "archive write failed: disk full"}  # fmt: skip
    assert archive_status({b"old": stale}) == {"status": "no log bin"}
    assert archive_status({b"x": b"not json"}) == {"status": "no log bin"}


def _on(cluster: redis.RedisCluster, port: int, others: bool, prefix: str) -> str:
    """A deployment name whose keys live on the master at ``port`` (or, ``others``, not)."""
    for i in range(1000):
        name = f"{prefix}{i}"
        mine = int(cluster.get_node_from_key(names.workers_key(name)).port) == port
        if mine != others:
            return name
    raise AssertionError("no such name")


async def test_on_a_cluster_a_master_that_does_not_answer_holds_up_only_what_it_holds(
    redis_cluster: LocalCluster, rc: redis.RedisCluster
) -> None:
    stats_port = int(rc.get_node_from_key(names.LOGBIN_STATS).port)
    here, there = _on(rc, stats_port, True, "live-"), _on(rc, stats_port, False, "away-")
    _live(rc, here, "real")
    _live(rc, there, "real")
    client = await connect_async(redis_cluster.url, timeout_s=2.0)
    pid = redis_cluster.pid(stats_port)
    assert pid is not None
    try:
        timeout_s = 5.0
        status, doc, _ = await readiness(client, [here, there], timeout_s, None)
        assert status == 200, doc
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, doc, _ = await readiness(client, [here, there], timeout_s, None, 0.3)
            took_s = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert took_s < 1.0, "each read is bounded on its own"
        assert doc["deployments"][here]["ready"] is True, doc
        assert doc["deployments"][there] == {"ready": False,
                                             "error": "Redis did not answer in time"}  # fmt: skip
        assert doc["archive"]["status"] == "unknown", doc
        assert status == 503, "a deployment whose node does not answer cannot be served"
        # The archive's counters alone away: still ready.
        os.kill(pid, signal.SIGSTOP)
        try:
            status, doc, _ = await readiness(client, [here], timeout_s, None, 0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert status == 200 and doc["ready"] is True, doc
        assert doc["archive"]["status"] == "unknown", doc
        assert "did not answer" in doc["archive"]["reason"], doc
    finally:
        await client.aclose()
        redis_cluster.wait_healthy(30.0)


async def test_workers_whose_heartbeats_redis_refuses_are_said_as_such(
    r: redis.Redis, redis_url: str
) -> None:
    """At its memory limit (noeviction) or unable to persist (MISCONF), Redis refuses the
    workers' heartbeats: ``/readyz`` said only "no live worker" (``live_workers: {}``) and the
    archive ``ok`` from counters the log bins could no longer renew (a helper's probe), so an
    operator looked for dead workers. A deployment with no live real worker is asked one write
    that changes nothing (``ZADD XX`` of no member) on its own node: refused, it names why."""
    r.zadd(names.workers_key("a"), {"real|real-1": time.time() - 60})  # last heard 60 s ago
    r.hset(names.LOGBIN_STATS, "lb-1", json.dumps({"ts": time.time(), "failing": ""}))
    client = await connect_async(redis_url, timeout_s=2.0)
    r.config_set("maxmemory", 1)  # noeviction: every write that may grow memory refused
    try:
        started = time.monotonic()
        status, doc, _ = await readiness(client, ["a"], 5.0, None)
        assert time.monotonic() - started < 0.8
        assert status == 503 and doc["ready"] is False, doc
        dep = doc["deployments"]["a"]
        assert dep["live_workers"] == {} and dep["ready"] is False, doc
        assert "memory limit" in dep["error"] and "heartbeats" in dep["error"], doc
        assert doc["archive"]["status"] == "unknown", doc
        assert "memory limit" in doc["archive"]["reason"], doc
    finally:
        r.config_set("maxmemory", 0)
    try:
        # Writes taken again, the workers still silent: no live worker, and no reason made up.
        status, doc, _ = await readiness(client, ["a"], 5.0, None)
        assert status == 503 and doc["deployments"]["a"] == {"live_workers": {}, "ready": False}
        assert doc["archive"] == {"status": "ok"}
        assert r.zrange(names.workers_key("a"), 0, -1) == [b"real|real-1"], "the probe wrote"
    finally:
        await client.aclose()


async def test_a_redis_that_cannot_persist_is_named_by_readiness(tmp_path: Path) -> None:
    """MISCONF (its disk is full: a snapshot failed with stop-writes-on-bgsave-error) refuses
    every write, the reply reader's ``XREADGROUP`` included: the deployment and the reply
    stream say that Redis cannot write to its disk, not a raw ``ResponseError``."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    sync = redis.Redis.from_url(server.url)
    client = await connect_async(server.url, timeout_s=2.0)
    try:
        sync.zadd(names.workers_key("a"), {"real|real-1": time.time() - 60})
        gone = tmp_path / "gone"
        gone.mkdir()
        sync.config_set("save", "3600 1")
        sync.config_set("dir", str(gone))
        gone.rmdir()
        sync.bgsave()
        deadline = time.monotonic() + 10
        while sync.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the snapshot never failed"
            await asyncio.sleep(0.02)
        status, doc, _ = await readiness(client, ["a"], 5.0, None)
        assert status == 503, doc
        assert "cannot write its data to disk" in doc["deployments"]["a"]["error"], doc
        reader = Rendezvous(client, Router(client, timeout_s=2.0), names.reply_stream("t-m"),
                            StreamAppender(Router(client, timeout_s=2.0)))  # fmt: skip
        await reader.start()
        try:
            for _ in range(150):  # its first read meets the refusal
                if reader.read_failure is not None:
                    break
                await asyncio.sleep(0.02)
            status, doc, _ = await readiness(client, ["a"], 5.0, reader.read_failure)
        finally:
            await reader.stop()
        assert "cannot write its data to disk" in doc["replies"], doc
        assert "ResponseError" not in doc["replies"], doc
    finally:
        sync.config_set("dir", str(tmp_path / "redis"))  # else its shutdown's save fails
        sync.bgsave()
        await client.aclose()
        sync.close()
        server.stop()
