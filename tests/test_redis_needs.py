"""What the system needs of the Redis it is given, as managed services restrict it (found by a
helper's probe; a real redis-server of this module's own, configured as those services do):
an evicting policy or a user without scripts is refused at start in one line; a user without
INFO (``-@dangerous``) or without MEMORY works."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.cli.main import main
from gateway.dataplane.deployments import DeploymentCache
from processes import wait_until
from rendezvous import names
from rendezvous.bus.connection import connect, connect_async
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.redis_needs import RedisUnfit, check, check_async
from rendezvous.bus.server import EmbeddedRedis, free_port

USERS = {
    "noscripts": "+@all -@scripting",
    "noinfo": "+@all -@admin -@dangerous",  # INFO and CLIENT taken (on Redis 6, CLUSTER too)
    "nomemory": "+@all -memory",
    "noxack": "+@all -xack",
    "noxadd": "+@all -xadd",
    "nozadd": "+@all -zadd",
    "notime": "+@all -time",
    "noevalsha": "+@all -evalsha",
    "noxinfo": "+@all -xinfo",
    "nomulti": "+@all -multi",
}
NARROW = "~rdv:{a* ~rdv:deployments"
"""A key pattern that leaves out most of the system's keys (the probe's among them)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("needs")).start()
    admin = redis.Redis.from_url(server.url)
    for user, rules in USERS.items():
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "&*",
                              *rules.split())  # fmt: skip
    admin.execute_command("ACL", "SETUSER", "narrow", "reset", "on", ">pw", "&*", "+@all",
                          *NARROW.split())  # fmt: skip
    admin.close()
    yield server
    server.stop()


def url_of(server: EmbeddedRedis, user: str) -> str:
    return server.url.replace("redis://", f"redis://{user}:pw@")


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.config_set("maxmemory", 0)
    client.config_set("maxmemory-policy", "noeviction")
    client.close()


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "allkeys-random"])
def test_an_evicting_redis_is_refused_at_start_unless_allowed(
    server: EmbeddedRedis,
    admin: redis.Redis,
    policy: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin.config_set("maxmemory", 200 * 2**20)
    admin.config_set("maxmemory-policy", policy)
    with pytest.raises(RedisUnfit, match=f"maxmemory-policy is {policy}.*noeviction"):
        check(admin, allow_eviction=False)
    assert check(admin, allow_eviction=True) is not None  # allowed: said, not refused
    monkeypatch.setenv("RDV_REDIS_URL", server.url)
    with pytest.raises(SystemExit) as ended:  # before uvicorn starts anything
        main(["gateway", "--port", "1"])
    assert "maxmemory-policy" in str(ended.value.code) and "RDV_ALLOW_EVICTION" in str(
        ended.value.code
    )
    admin.config_set("maxmemory-policy", "noeviction")
    assert check(admin, allow_eviction=False) is not None
    admin.config_set("maxmemory", 0)
    admin.config_set("maxmemory-policy", policy)  # no limit: nothing is ever evicted
    assert check(admin, allow_eviction=False) is not None


async def test_a_user_without_scripts_is_refused_naming_them(server: EmbeddedRedis) -> None:
    client = connect(url_of(server, "noscripts"))
    with pytest.raises(RedisUnfit, match=r"EVAL.*\+@scripting"):
        check(client, allow_eviction=False)
    client.close()
    aclient = await connect_async(url_of(server, "noscripts"))
    with pytest.raises(RedisUnfit, match=r"\+@scripting"):
        await check_async(aclient, allow_eviction=False)
    await aclient.aclose()


@pytest.mark.parametrize(("user", "says"), [
    ("noxack", "no permissions to run the 'xack' command"),
    ("noxadd", "no permissions to run the 'xadd' command"),
    # passed the check, then (a helper's probe on a cluster): worker hosts restarting for
    # ever (ZADD, TIME), predicts 504, partitioned deployments refused (XINFO), deleted
    # deployments never purged (EVALSHA)
    ("nozadd", "no permissions to run the 'zadd' command"),
    ("notime", "no permissions to run the 'time' command"),
    ("noevalsha", "no permissions to run the 'evalsha' command"),
    ("noxinfo", "no permissions to run the 'xinfo' command"),
    ("narrow", "the system's keys"),
])  # fmt: skip
async def test_a_user_without_a_data_command_or_the_keys_is_refused_naming_it(
    server: EmbeddedRedis, user: str, says: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only EVAL was checked: without XADD every gateway start ended in a traceback, restarted
    for ever; without XACK the gateway said ready while predicts timed out; a key pattern too
    narrow was said to want +@scripting (a helper's probe). Redis 6 checks no ACL inside a
    script: the commands are probed as they are."""
    client = connect(url_of(server, user))
    with pytest.raises(RedisUnfit, match=re.escape(says)):
        check(client, allow_eviction=False)
    client.close()
    aclient = await connect_async(url_of(server, user))
    with pytest.raises(RedisUnfit, match=re.escape(says)):
        await check_async(aclient, allow_eviction=False)
    await aclient.aclose()
    # a worker host and a log bin too: without XADD a worker took a batch and exited, restarted
    # for ever; without XACK both ran on acking nothing (a helper's live check)
    monkeypatch.setenv("RDV_REDIS_URL", url_of(server, user))
    monkeypatch.setenv("RDV_DATA_DIR", str(tmp_path))
    for argv in (["worker", "--deployment", "d"], ["logbin", "--consumer", "probe"]):
        with pytest.raises(SystemExit) as ended:
            main(argv)
        assert says in str(ended.value.code), (argv, ended.value.code)


def test_a_refusal_names_the_node_once_every_node_named_was_tried(server: EmbeddedRedis) -> None:
    """A refusal by one node of several stopped the start at it and named none (a user
    missing on one node of a cluster; a helper's probe): the other nodes are tried first."""
    from rendezvous.bus.failures import permanent_refusal

    dead = free_port()
    live = server.url.removeprefix("redis://").split("/")[0]
    started = time.monotonic()
    with pytest.raises(redis.AuthenticationError) as refused:
        connect(f"redis://noxack:wrong@{live},127.0.0.1:{dead}", wait_s=10)
    assert time.monotonic() - started < 5  # not retried as if Redis were starting
    said = permanent_refusal(refused.value)
    assert said is not None and f"at redis://***@{live}" in said and "wrong" not in said


async def test_a_user_without_info_or_memory_connects_and_serves(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """``-@dangerous`` takes INFO (and on Redis 6, CLUSTER): every process stopped at start
    with "no permissions to run the 'info' command". Without MEMORY, every gateway start
    failed in its deployments refresh."""
    from rendezvous.retry_log import SAID_ONCE

    SAID_ONCE.discard("unchecked")  # said once a process: this test's to say
    with caplog.at_level(logging.WARNING):
        client = connect(url_of(server, "noinfo"))
        assert isinstance(client, redis.Redis) and client.ping()
        assert check(client, allow_eviction=False) is None  # unchecked, said
        client.close()
    assert any("go unchecked" in m for m in caplog.messages)
    aclient = await connect_async(url_of(server, "noinfo"))
    try:
        assert await check_async(aclient, allow_eviction=False) is None
        await DeploymentCache(aclient).refresh()
    finally:
        await aclient.aclose()
    aclient = await connect_async(url_of(server, "nomemory"))
    try:
        await aclient.sadd("rdv:deployments", "nothing-here")
        cache = DeploymentCache(aclient)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await cache.refresh()
            await cache.refresh()
        assert not cache.measures_memory and cache.backlog_bytes == {"nothing-here": 0}
        assert sum("refused MEMORY USAGE" in m for m in caplog.messages) == 1
    finally:
        await aclient.delete("rdv:deployments")
        await aclient.aclose()


async def test_a_redis_that_lost_its_data_is_said_loudly_once(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted without persistence came back empty: every predict was a 404 and the
    workers said only, at INFO, that their roles were gone (found by a helper's probe)."""
    client = await connect_async(server.url)
    try:
        # under rdv:* as every key (it was "{rdv:deployments}:...": a user of ~rdv:* could not
        # make it, and a lost Redis went unsaid; a helper's probe)
        assert names.DATA_MARK.startswith("rdv:")
        await client.delete(names.DATA_MARK)
        cache = DeploymentCache(client)
        with caplog.at_level(logging.ERROR):
            await cache.refresh()  # the first look makes the mark
            await cache.refresh()
            assert not caplog.messages
            await client.flushdb()
            await cache.refresh()
            await cache.refresh()
        lost = [m for m in caplog.messages if "lost this system's data" in m]
        assert len(lost) == 1, caplog.messages
        caplog.clear()
        await client.sadd("rdv:deployments", "still-here")  # a mark evicted alone: no alarm
        await client.delete(names.DATA_MARK)
        with caplog.at_level(logging.ERROR):
            await cache.refresh()
        assert not caplog.messages and await client.exists(names.DATA_MARK)
    finally:
        await client.delete("rdv:deployments")
        await client.aclose()


def test_an_evicting_policy_on_any_master_of_a_cluster_is_refused(
    redis_cluster: LocalCluster, rc: redis.RedisCluster
) -> None:
    """A cluster client's INFO went to one node (on Redis 7, to every node, as replies by node
    that read as no limit): the managed services' clusters, evicting by default, passed."""
    asked = rc.get_default_node().port  # where a plain INFO goes
    others = [redis_cluster.client(p) for p in redis_cluster.masters() if p != asked]
    try:
        for node in others:
            node.config_set("maxmemory", 200 * 2**20)
            node.config_set("maxmemory-policy", "volatile-lru")
        with pytest.raises(RedisUnfit, match="maxmemory-policy is volatile-lru"):
            check(rc, allow_eviction=False)
    finally:
        for node in others:
            node.config_set("maxmemory", 0)
            node.config_set("maxmemory-policy", "noeviction")
            node.close()
    assert check(rc, allow_eviction=False) is not None


def test_a_user_without_transactions_is_refused_naming_them(server: EmbeddedRedis) -> None:
    """Without MULTI the check passed and every admin change answered 503 'Redis is
    unavailable: ResponseError' (a helper's probe on a cluster)."""
    client = connect(url_of(server, "nomulti"))
    with pytest.raises(RedisUnfit, match=re.escape("Redis refused a transaction (MULTI)")):
        check(client, allow_eviction=False)
    client.close()


def test_a_user_without_cluster_slots_is_told_so_not_asked_whether_redis_runs() -> None:
    """redis-py's cluster client raises "Cluster mode is not enabled on this node" from the
    NOPERM of CLUSTER SLOTS: ``rdv serve`` waited 30 s and said Redis 'did not answer ... Is
    it running?' (a helper's probe on a cluster, a user with +cluster|info alone)."""
    from redis.exceptions import NoPermissionError, RedisClusterException

    from rendezvous.bus.failures import permanent_refusal

    try:
        try:
            raise NoPermissionError(
                "this user has no permissions to run the 'cluster' command or its subcommand"
            )
        except redis.exceptions.ResponseError:
            raise RedisClusterException("Cluster mode is not enabled on this node") from None
    except RedisClusterException as exc:
        said = permanent_refusal(exc)
    assert said is not None and "+cluster|slots" in said, said


def test_a_redis_that_cannot_write_its_disk_is_connected_checked_and_read(tmp_path: Path) -> None:
    """Redis refuses PING with MISCONF while it cannot persist, and every fresh connection
    sent one first (redis-py's health check): a start failed at once, rdv serve's backoff kept
    the processes away ~30 s after the disk was freed, and ``rdv decisions`` or ``rdv archive
    export``, reads alone, failed when an operator most wanted them (a helper's disk probe).
    Writes are refused for a while; the start's check passes, and reads are served."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    try:
        admin.xadd("rdv:{d}:decisions", {"r": "1"})
        admin.config_set("save", "3600 1")  # snapshots on: a failed one stops writes
        admin.config_set("dir", "/proc")  # a snapshot cannot be written there, even by root
        admin.bgsave()
        wait_until(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err", 10,
                   "the snapshot to fail")  # fmt: skip
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            admin.ping()
        client = connect(server.url, wait_s=2.0)
        check(client, allow_eviction=False)  # refused for a while: not the start's to judge
        assert client.xlen("rdv:{d}:decisions") == 1
        client.close()
    finally:
        admin.config_set("dir", str((tmp_path / "redis").resolve()))
        admin.close()
        server.stop()


def test_checks_run_at_once_by_several_processes_pass(
    server: EmbeddedRedis, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rdv serve starts its processes at once, and each checks: another's probe touched the
    key a transaction's check watched, and its EXEC's WatchError ended a worker host's start
    with a traceback (found live, on the transaction's check when it was new)."""
    from rendezvous.bus.redis_needs import PROBE_KEYS

    client = connect(server.url)
    pipeline = client.pipeline

    def meddled(transaction: bool = True) -> Any:
        tx = pipeline(transaction=transaction)
        multi = tx.multi

        def touched_first() -> None:
            admin.hset(PROBE_KEYS[1], "other", "1")  # another process's probe, meanwhile
            multi()

        tx.multi = touched_first  # type: ignore[method-assign]
        return tx

    monkeypatch.setattr(client, "pipeline", meddled)
    check(client, allow_eviction=False)
    client.close()


async def test_the_gateways_check_leaves_no_probe_key_on_either_bus(bus_url: str) -> None:
    """On a cluster the gateway's (async) check queued its UNLINKs with the async cluster
    pipeline's ``unlink``, a coroutine never awaited: a RuntimeWarning in every gateway's log
    at start, and the probe keys left in Redis (a helper's multi-host probe)."""
    import warnings

    from rendezvous.bus.redis_needs import PROBE_KEYS

    aclient = await connect_async(bus_url)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            await check_async(aclient, allow_eviction=False)
            import gc

            gc.collect()  # a coroutine never awaited warns when it is collected
        assert not [w for w in caught if "never awaited" in str(w.message)]
        assert [k for k in PROBE_KEYS if await aclient.exists(k)] == []
    finally:
        await aclient.aclose()
