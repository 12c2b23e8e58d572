"""Redis connection factories that wait for the server, for processes and for the gateway.

``RDV_REDIS_URL`` may name a single Redis or any node of a Redis Cluster: the factories ask the
node (``INFO cluster``) and hand back redis-py's cluster client for a cluster, which discovers
the other nodes and follows the slots as they move. Everything above speaks the commands both
clients share; what must differ (where a batch of hot-path commands goes) is
``rendezvous.bus.routing``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import ClusterNode as SyncClusterNode
from redis.retry import Retry

from rendezvous.bus.failures import REDIS_DOWN, permanent_refusal
from rendezvous.bus.redis_needs import refused_for_good
from rendezvous.bus.urls import redacted, seed_urls
from rendezvous.bus.waiting_cluster import SPARE_CONNECTIONS, Turns, WaitingRedisCluster
from rendezvous.retry_log import warn_once

log = logging.getLogger(__name__)

_RETRYABLE: tuple[type[Exception], ...] = (*REDIS_DOWN, OSError)


# No ``health_check_interval``: its PING before a fresh (or idle) connection's first command
# is refused with MISCONF while Redis cannot write its disk, which failed every start and every
# read of a new connection (``rdv decisions``, an export; a helper's disk probe). A pooled
# connection found dead is sent again on a fresh one (below) instead.


def _stale_connection_retry(kind: type[Retry] | type[AsyncRetry] = Retry) -> Any:
    """One immediate retry, on a fresh connection, of a command whose pooled connection turns
    out dead. A pooled connection that died without an end-of-file (reset by a Redis restart
    mid-handshake, for one) passes the pool's check and fails its first command; without this
    a request sent well after Redis came back got a 503 (tests/test_faults.py, about one run
    in four). A timeout is not retried: it would double the caller's wait. A retried XADD may
    be written twice if only its reply was lost, which the at-least-once readers absorb."""
    return kind(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


CLUSTER_RETRIES = 2
"""Attempts a cluster command makes after its first failed on a lost node or a cluster that is
down, each on a fresh topology: enough for a failover already done or a slot moved. redis-py's
ten, spaced up to a second apart, kept a job submit, a label or an admin call 3-5 s before its
503 with a shard down, where predict (its own router) answered in a quarter of a second; an
election still running outlasts any wait a caller should sit out, and gets 503 and
``Retry-After`` (the workers and the log bin ride it out as any outage)."""


def _cluster_retry(kind: type[Retry] | type[AsyncRetry] = Retry) -> Any:
    return kind(ExponentialWithJitterBackoff(base=0.01, cap=0.1), CLUSTER_RETRIES)


Client = redis.Redis | redis.RedisCluster
AsyncClient = aioredis.Redis | aioredis.RedisCluster


def _cluster_enabled(info: dict[str, Any]) -> bool:
    return str(info.get("cluster_enabled", "0")) == "1"


def _is_cluster(client: redis.Redis) -> bool:
    """Whether the node is part of a Redis Cluster: ``INFO cluster``; for a user without
    ``INFO`` (``-@dangerous`` takes it on Redis 7: every process stopped at start), or with it
    renamed away, ``CLUSTER INFO``, which a node outside a cluster refuses. A user that may
    run neither is taken to be on one node (a cluster client could not start without
    ``CLUSTER SLOTS`` anyway)."""
    try:
        return _cluster_enabled(client.info("cluster"))
    except redis.exceptions.ResponseError as exc:
        if not refused_for_good(exc):
            raise
    try:
        client.execute_command("CLUSTER INFO")
        return True
    except redis.exceptions.ResponseError as exc:
        return _refused_as_single(exc)


async def _is_cluster_async(client: aioredis.Redis) -> bool:
    """``_is_cluster`` for an asyncio client."""
    try:
        return _cluster_enabled(await client.info("cluster"))
    except redis.exceptions.ResponseError as exc:
        if not refused_for_good(exc):
            raise
    try:
        await client.execute_command("CLUSTER INFO")
        return True
    except redis.exceptions.ResponseError as exc:
        return _refused_as_single(exc)


def _refused_as_single(refusal: Exception) -> bool:
    """False, the node taken as a single one: a node outside a cluster refuses ``CLUSTER
    INFO``, and so does a user without it (said)."""
    if "cluster support disabled" not in str(refusal):
        warn_once(log, "single", "cannot tell whether Redis is a cluster (%s): taken as a "
                  "single node", refusal)  # fmt: skip
    return False


def _several_seeds_need_a_cluster(seeds: list[str], seed: str) -> NoReturn:
    raise ValueError(
        f"RDV_REDIS_URL names {len(seeds)} nodes, but {redacted(seed)} is not part of a "
        "Redis Cluster: name the one node of a single Redis (or, if it is a cluster's, the "
        "user may run neither INFO nor CLUSTER INFO, as under -@dangerous on Redis 6: grant "
        "it +cluster|info +cluster|slots)"
    )


def _other_nodes(seeds: list[str], seed: str, node: Callable[..., Any]) -> list[Any] | None:
    """The seeds but ``seed`` as redis-py's cluster nodes (None: there are none)."""
    others = [urlsplit(s) for s in seeds if s != seed]
    return [node(u.hostname, u.port or 6379) for u in others] or None


SOCKET_TIMEOUT_S = 30.0
"""The bound on a synchronous client's every command when its caller sets none: no command of
ours takes that long on a Redis that works, and one that does not answer (stopped, its
packets dropped) left a CLI command or a gateway's start waiting for good."""


def connect(url: str, wait_s: float = 30.0, socket_timeout_s: float | None = None) -> Client:
    """A synchronous client (workers, log bin), after the server answered: a cluster client
    when the node at ``url`` is part of a Redis Cluster (of the nodes it names, the first that
    answers). ``socket_timeout_s`` bounds every command (None: ``SOCKET_TIMEOUT_S``)."""
    socket_timeout_s = socket_timeout_s or SOCKET_TIMEOUT_S
    seeds = seed_urls(url)
    deadline = time.monotonic() + wait_s
    delay_s = 0.05
    attempt = 0
    while True:
        seed = seeds[attempt % len(seeds)]
        attempt += 1
        client = redis.Redis.from_url(
            seed,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=2.0,
            retry=_stale_connection_retry(),
        )
        try:
            if not _is_cluster(client):
                if len(seeds) > 1:
                    client.close()
                    _several_seeds_need_a_cluster(seeds, seed)
                return client
            client.close()
            return redis.RedisCluster.from_url(
                seed,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=2.0,
                retry=_cluster_retry(),
                startup_nodes=_other_nodes(seeds, seed, SyncClusterNode),
            )
        except _RETRYABLE as exc:
            client.close()
            if _give_up(exc, seed, seeds, attempt, deadline):
                raise
            if attempt % len(seeds):
                continue  # the next node at once
            (log.debug if attempt > len(seeds) else log.warning)(  # said once a wait
                "redis at %s not ready (%s); retrying", redacted(url), exc
            )
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


def _give_up(
    exc: BaseException, seed: str, seeds: list[str], attempt: int, deadline: float
) -> bool:
    """Whether a start's failure at ``seed`` ends its tries: past the wait, or a refusal for
    good (a user or password, a certificate) once every seed was tried. A refusal by one node
    of several stopped at it, and named none (a user missing on one node of a cluster; a
    helper's probe)."""
    refused = permanent_refusal(exc) is not None
    if refused:
        exc.add_note(f"at {redacted(seed)}")
    return time.monotonic() > deadline or (refused and attempt >= len(seeds))


DEFAULT_MAX_CONNECTIONS = 256


async def connect_async(
    url: str,
    wait_s: float = 30.0,
    timeout_s: float | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> AsyncClient:
    """An asyncio client (gateway), after the server answered, for a cluster as ``connect``.
    ``timeout_s`` bounds every command, so a hung server turns into an error instead of a hung
    request.

    At most ``max_connections`` commands at once (connections to a node); the next waits for
    a free one, up to ``timeout_s``. With redis-py's default pool, which fails at once past
    100, a burst of long polls or readiness probes got 503 from a healthy Redis."""
    seeds = seed_urls(url)
    deadline = time.monotonic() + wait_s
    delay_s = 0.05
    attempt = 0
    while True:
        seed = seeds[attempt % len(seeds)]
        attempt += 1
        pool = aioredis.BlockingConnectionPool.from_url(
            seed,
            max_connections=max_connections,
            timeout=timeout_s,  # the wait for a free connection
            socket_connect_timeout=2.0,
            socket_timeout=timeout_s,
            retry=_stale_connection_retry(AsyncRetry),
        )
        client = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        try:
            if not await _is_cluster_async(client):
                if len(seeds) > 1:
                    await client.aclose()
                    _several_seeds_need_a_cluster(seeds, seed)
                return client
            await client.aclose()
            cluster = WaitingRedisCluster.from_url(
                seed,
                socket_timeout=timeout_s,
                socket_connect_timeout=2.0,
                max_connections=max_connections + SPARE_CONNECTIONS,
                retry=_cluster_retry(AsyncRetry),
                startup_nodes=_other_nodes(seeds, seed, AsyncClusterNode),
            )
            assert isinstance(cluster, WaitingRedisCluster)
            cluster.turns = Turns(max_connections, timeout_s)
            await cluster.initialize()
            return cluster
        except _RETRYABLE as exc:
            await client.aclose()
            if _give_up(exc, seed, seeds, attempt, deadline):
                raise
            if attempt % len(seeds):
                continue  # the next node at once
            (log.debug if attempt > len(seeds) else log.warning)(  # said once a wait
                "redis at %s not ready (%s); retrying", redacted(url), exc
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


async def on_key_node(client: AsyncClient, key: str, *args: Any) -> Any:
    """``args``, a command whose keys redis-py can find only by asking a node (``XREAD``,
    ``XREADGROUP``: on Redis before 7 it sends ``COMMAND GETKEYS`` to its default node), run
    on the node of ``key`` as the slots stand. A cluster client whose default node is lost
    failed every such command for good: the failure comes before the command is routed, so
    nothing asks for a new topology (the jobs' reads, after the node in ``RDV_REDIS_URL``
    failed over). Here a lost node fails the command as any other does, which asks for one,
    and the next call runs it first (``initialize``)."""
    if isinstance(client, aioredis.RedisCluster):
        await client.initialize()
        return await client.execute_command(*args, target_nodes=client.get_node_from_key(key))
    return await client.execute_command(*args)


def text(value: bytes | str) -> str:
    """A reply of a client made without ``decode_responses`` as text. Such a client always
    answers bytes; redis-py's annotations say ``bytes | str`` for either kind of client."""
    return value.decode() if isinstance(value, bytes) else value
