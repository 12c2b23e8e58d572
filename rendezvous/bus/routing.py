"""Send a batch of single-key commands to the nodes that own their keys, on redis-py's own
connections, and read the raw replies.

The hot path (the gateway's appends and reply reads, a worker's reads, results and acks) sends
few kinds of command, many at a time. On this machine redis-py's command layer and pipelines
cost about 19 µs of CPU a command, its connections sent a packed batch and read reply by reply
about 11 (``benchmarks/PROFILE.md``). So the hot path packs one batch per node, writes it at
once and reads the replies as they are (no response callbacks), while everything else stays
on redis-py's clients.

Which node owns a key is the client's business: a single-node ``Redis`` has one, a
``RedisCluster`` answers ``get_node_from_key`` from its slot table. The commands a node answers
with a redirect or a cluster error, or loses with its connection, go once more:

- ``MOVED``, ``TRYAGAIN`` (after a short pause), ``CLUSTERDOWN``, a lost node (a failover): the
  client is asked about the key through its own command layer (``EXISTS``), which follows the
  redirect or, after a connection error, rebuilds its slot table from the nodes still up; the
  command then goes to the slot's owner by the refreshed table. After a lost node or
  ``CLUSTERDOWN`` a router waits for that at most ``LOST_NODE_WAIT_S`` (the search goes on
  in the background): an election takes seconds, the gateway's callers are better told 503
  at once than left to their timeout, and a consumer of several nodes (partitions, the log
  bin's deployments) goes on with the nodes that answer.
- ``ASK`` (a slot being migrated, this key already moved): the command goes to the node named,
  after ``ASKING``; the table stays as it is until the migration ends with a ``MOVED``.
- On a single node, a connection that died quietly (Redis restarted) fails its first use: the
  commands go once more on a fresh connection.

A command may thus run twice if only its reply was lost: every reader of the streams is
at-least-once. A timeout is not retried (it would double the caller's wait).

Replies come back in the order of the commands. An error reply is an exception object in its
place, never raised, like a pipeline's ``raise_on_error=False``, so that one node's trouble
fails only the commands that went to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError
from redis.utils import SENTINEL

from rendezvous.bus.connection import REDIS_FAILURES
from rendezvous.bus.connection import AsyncClient as AnyAsyncClient
from rendezvous.bus.connection import Client as AnyClient

_ASKING = (b"ASKING",)
TRYAGAIN_PAUSE_S = 0.01
"""A multi-key command whose keys are split by a slot migration is refused with TRYAGAIN: the
one retry comes after this pause, as Redis asks."""
LOST_NODE_WAIT_S = 0.25
"""How long a batch whose node was lost (a refused connection, ``CLUSTERDOWN``) waits
for the cluster client to find the slot's new owner before its commands fail. The client's
own search (its retries, up to seconds: a failover's election) goes on in the background, and
the batches that find it under way fail at once, so the gateway's callers get a quick 503
meanwhile instead of waiting for their timeout, and the batches after the election go to the
new owner. A node that is back at once (a restart) is found within the wait, and the batch
goes through."""

SEARCH_S = 10.0
SEARCH_PAUSE_S = 0.1
"""A background search for a lost node's successor asks again every ``SEARCH_PAUSE_S``, for at
most ``SEARCH_S``, and ends as soon as the cluster client knows the slot's owner. One that
gives up after the client's own retries while the election still runs can leave its process
routing to the dead node until a later batch starts another."""


_CONNECTION_FAILURES: tuple[type[Exception], ...] = (*REDIS_FAILURES, AttributeError)
"""What a batch's connection may fail with: Redis's failures, and a socket closed under it
(see ``_torn``)."""


class Command(NamedTuple):
    """One command and the key that decides its node (a stream, a hash...)."""

    key: bytes
    args: tuple[bytes, ...]


def command(*args: bytes, key_at: int = 1) -> Command:
    """A command whose key is its argument ``key_at`` (XADD, XACK, HSET...: the first)."""
    return Command(args[key_at], args)


def raise_first_error(replies: list[Any]) -> list[Any]:
    """Replies of a batch, like a redis-py pipeline's: the first error reply is raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def slot_of(client: AnyClient | AnyAsyncClient, key: bytes) -> int:
    """The key's cluster slot; 0 for every key of a single node, where any keys mix."""
    if isinstance(client, redis.RedisCluster | aioredis.RedisCluster):
        return client.keyslot(key)
    return 0


def _again(reply: Any) -> bool:
    """Worth one more try, after following the cluster (a timeout is not: see the module)."""
    if isinstance(reply, redis.TimeoutError):
        return False
    return isinstance(reply, AskError | TryAgainError | ClusterDownError | redis.ConnectionError)


def _node_lost(reply: Any) -> bool:
    """The command's node is gone or its cluster is electing: finding the new owner may take
    as long as a failover does."""
    return isinstance(reply, redis.ConnectionError | ClusterDownError)


def _asked(reply: Any) -> bool:
    return isinstance(reply, AskError) and not isinstance(reply, MovedError)


Plan = dict[Any, list[tuple[int, bool]]]
"""node (None: the single node) -> (command index, preceded by ASKING) in the order sent."""


class BlockingRouter:
    """For a synchronous process (model workers, the log bin); not thread-safe, like the loop
    that owns it."""

    def __init__(self, client: AnyClient, *, timeout_s: float | None):
        self.client = client
        self.timeout_s = timeout_s
        """The client's socket timeout: reads use it unless a batch says otherwise."""
        self._conns: dict[str, Any] = {}
        self._search: threading.Thread | None = None
        """The cluster client following a lost node, on a thread of its own (redis-py's
        cluster client may be shared between threads: it locks its slot table), so that the
        batches of a consumer reading several nodes go on while one node is being elected
        (see ``LOST_NODE_WAIT_S``)."""

    def execute(self, commands: Sequence[Command], *, timeout_s: float | None = None) -> list[Any]:
        """The replies of ``commands`` in order; ``timeout_s`` overrides the router's own for
        this batch (a blocking read adds its block time). Every node's batch is written before
        any reply is read, so the nodes work on them at the same time."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        replies: list[Any] = [None] * len(commands)
        self._run(_plan(self.client, commands, range(len(commands)), replies), commands,
                  replies, timeout_s)  # fmt: skip
        again = [i for i, reply in enumerate(replies) if _again(reply)]
        if again:
            if any(isinstance(replies[i], TryAgainError) for i in again):
                time.sleep(TRYAGAIN_PAUSE_S)
            self._follow(commands, again, replies)
            plan = _plan(self.client, commands, again, replies)
            self._run(plan, commands, replies, timeout_s)
        return replies

    def _follow(
        self, commands: Sequence[Command], again: Sequence[int], replies: list[Any]
    ) -> None:
        """Let the cluster client follow what the nodes said, one key per slot; after a lost
        node, for at most ``LOST_NODE_WAIT_S`` (its search goes on in the background)."""
        if not isinstance(self.client, redis.RedisCluster):
            return
        keys = _keys_to_follow(self.client, commands, again, replies)
        if not any(_node_lost(replies[i]) for i in again):  # a redirect: answered at once
            self._follow_keys(keys)
            return
        if self._search is None or not self._search.is_alive():  # else: fail at once
            self._search = threading.Thread(target=self._follow_keys, args=(keys, SEARCH_S),
                                            name="rdv-cluster-search", daemon=True)  # fmt: skip
            self._search.start()
            self._search.join(LOST_NODE_WAIT_S)

    def _follow_keys(self, keys: Sequence[bytes], search_s: float = 0.0) -> None:
        """Ask for each key once, or until answered for up to ``search_s`` (a search)."""
        assert isinstance(self.client, redis.RedisCluster)
        deadline = time.monotonic() + search_s
        for key in keys:
            while True:
                try:
                    self.client.exists(key)  # type: ignore[arg-type]
                    break
                except REDIS_FAILURES:  # still electing
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(SEARCH_PAUSE_S)

    def _run(self, plan: Plan, commands: Sequence[Command], replies: list[Any],
             timeout_s: float | None) -> None:  # fmt: skip
        sent: list[tuple[Any, list[tuple[int, bool]]]] = []
        # A timeout that is the connection's own needs no per-read setting (two syscalls).
        read_timeout: Any = timeout_s if timeout_s != self.timeout_s else SENTINEL
        for node, batch in plan.items():
            packed = _packed(commands, batch)
            try:
                conn = self._connection(node)
                conn.send_packed_command([packed], check_health=False)
            except _CONNECTION_FAILURES as exc:
                _lose(self._conns.get(_name(node)), batch, 0, _torn(exc), replies)
                continue
            sent.append((conn, batch))
        for conn, batch in sent:
            for done, (i, asking) in enumerate(batch):
                try:
                    if asking:
                        conn.read_response(timeout=read_timeout)
                    replies[i] = conn.read_response(timeout=read_timeout)
                except redis.ResponseError as exc:  # an error reply: still in step
                    replies[i] = exc
                except _CONNECTION_FAILURES as exc:
                    _lose(conn, batch, done, _torn(exc), replies)
                    break

    def _connection(self, node: Any) -> Any:
        """This router's own connection to ``node``, made once and kept (a pool's check on
        every borrow cost more than the commands): on a single node taken from the client's
        pool, on a cluster made from the node pool's settings; a connection that failed is
        reopened by its next command."""
        name = _name(node)
        conn = self._conns.get(name)
        if conn is None:
            if isinstance(self.client, redis.RedisCluster):
                # Made from the node pool's settings but kept out of the pool: while the
                # cluster client follows a failover it disconnects its pools (from the search
                # thread too), which must not cut this router's batches to nodes still up.
                pool = self.client.get_redis_connection(node).connection_pool
                conn = pool.connection_class(**pool.connection_kwargs)
            else:
                conn = self.client.connection_pool.get_connection()
            self._conns[name] = conn
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()
        self._conns.clear()


class Router:
    """The same for asyncio (the gateway). Concurrent batches take turns on each node's
    connection; the nodes of one batch are sent and read at the same time."""

    def __init__(self, client: AnyAsyncClient, *, timeout_s: float | None):
        self.client = client
        self.timeout_s = timeout_s
        self._closed = False
        self._conns: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._search: asyncio.Task[None] | None = None
        """The cluster client following a lost node, at most one at a time (see
        ``LOST_NODE_WAIT_S``)."""

    async def execute(
        self, commands: Sequence[Command], *, timeout_s: float | None = None
    ) -> list[Any]:
        """As ``BlockingRouter.execute``; after ``close``, every command fails."""
        if self._closed:
            return [redis.ConnectionError("this router was closed")] * len(commands)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        replies: list[Any] = [None] * len(commands)
        first = _plan(self.client, commands, range(len(commands)), replies)
        await self._run(first, commands, replies, timeout_s)
        again = [i for i, reply in enumerate(replies) if _again(reply)]
        if again and not self._closed:
            if any(isinstance(replies[i], TryAgainError) for i in again):
                await asyncio.sleep(TRYAGAIN_PAUSE_S)
            await self._follow(commands, again, replies)
            await self._run(
                _plan(self.client, commands, again, replies), commands, replies, timeout_s
            )
        return replies

    async def _follow(
        self, commands: Sequence[Command], again: Sequence[int], replies: list[Any]
    ) -> None:
        if not isinstance(self.client, aioredis.RedisCluster):
            return
        keys = _keys_to_follow(self.client, commands, again, replies)
        if not any(_node_lost(replies[i]) for i in again):  # a redirect: answered at once
            await self._follow_keys(keys)
            return
        if self._search is None or self._search.done():  # else: fail at once
            self._search = asyncio.get_running_loop().create_task(self._follow_keys(keys, SEARCH_S))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._search), LOST_NODE_WAIT_S)

    async def _follow_keys(self, keys: Sequence[bytes], search_s: float = 0.0) -> None:
        """Ask for each key once, or until answered for up to ``search_s`` (a search)."""
        assert isinstance(self.client, aioredis.RedisCluster)
        deadline = time.monotonic() + search_s
        for key in keys:
            while True:
                try:
                    await self.client.exists(key)  # type: ignore[arg-type]
                    break
                except REDIS_FAILURES:  # still electing
                    if self._closed or time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(SEARCH_PAUSE_S)

    async def _run(self, plan: Plan, commands: Sequence[Command], replies: list[Any],
                   timeout_s: float | None) -> None:  # fmt: skip
        if len(plan) == 1:  # the usual case: no task to gather
            [(node, batch)] = plan.items()
            await self._node_batch(node, batch, commands, replies, timeout_s)
            return
        await asyncio.gather(*(self._node_batch(node, batch, commands, replies, timeout_s)
                               for node, batch in plan.items()))  # fmt: skip

    async def _node_batch(self, node: Any, batch: list[tuple[int, bool]],
                          commands: Sequence[Command], replies: list[Any],
                          timeout_s: float | None) -> None:  # fmt: skip
        name = _name(node)
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        async with lock:  # one batch at a time on the node's connection: replies in order
            done = 0
            conn = None
            packed = _packed(commands, batch)
            try:
                conn = await self._connection(node)
                async with asyncio.timeout(timeout_s):
                    await conn.send_packed_command([packed], check_health=False)
                    for i, asking in batch:
                        if asking:
                            await _read(conn)
                        replies[i] = await _read(conn)
                        done += 1
            except _CONNECTION_FAILURES as exc:
                if conn is not None:
                    await conn.disconnect()  # a late reply would be taken for the next batch's
                lost = (redis.TimeoutError(f"Redis did not answer in {timeout_s}s")
                        if isinstance(exc, TimeoutError) else _torn(exc))  # fmt: skip
                for i, _ in batch[done:]:
                    replies[i] = lost

    async def _connection(self, node: Any) -> Any:
        """As ``BlockingRouter._connection``: made once and kept."""
        name = _name(node)
        conn = self._conns.get(name)
        if conn is None:
            if node is None:
                assert isinstance(self.client, aioredis.Redis)
                conn = await self.client.connection_pool.get_connection()
            else:
                # The node's settings, but not one of its connections: on CLUSTERDOWN the
                # cluster client closes every connection of every node (``aclose``), which
                # must not cut this router's batches to the nodes still up. No retry of its
                # own, as the node's connections: the router decides what goes again.
                kwargs = {**node.connection_kwargs, "retry": AsyncRetry(NoBackoff(), 0)}
                conn = node.connection_class(**kwargs)  # connects on its first command
            self._conns[name] = conn
        return conn

    async def close(self) -> None:
        """Drop every connection, a blocked read's too (it fails at once, and so does every
        later batch)."""
        self._closed = True
        if self._search is not None:
            self._search.cancel()
        for conn in list(self._conns.values()):
            await conn.disconnect()
        self._conns.clear()


def _plan(
    client: AnyClient | AnyAsyncClient,
    commands: Sequence[Command],
    indices: Sequence[int],
    replies: list[Any],
) -> Plan:
    """Which node each command goes to: the key's owner by the client's slot table, or the
    node an ``ASK`` named (after ``ASKING``); a command with nowhere to go keeps its error."""
    plan: Plan = {}
    cluster = client if isinstance(client, redis.RedisCluster | aioredis.RedisCluster) else None
    for i in indices:
        asked = _asked(replies[i])
        try:
            if cluster is None:
                node = None
            elif asked:
                node = cluster.get_node(host=replies[i].host, port=replies[i].port)
                if node is None:
                    continue  # a node the table does not know yet: the ASK stands
            else:
                node = cluster.get_node_from_key(commands[i].key)  # type: ignore[arg-type]
        except REDIS_FAILURES as exc:  # no slot table yet, a slot not covered
            replies[i] = exc
            continue
        plan.setdefault(node, []).append((i, asked))
    return plan


def _keys_to_follow(
    cluster: redis.RedisCluster | aioredis.RedisCluster,
    commands: Sequence[Command],
    again: Sequence[int],
    replies: list[Any],
) -> list[bytes]:
    """One key of each slot whose commands were refused other than by ``ASK``."""
    keys = {cluster.keyslot(commands[i].key): commands[i].key
            for i in again if not _asked(replies[i])}  # fmt: skip
    return list(keys.values())


def _packed(commands: Sequence[Command], batch: list[tuple[int, bool]]) -> bytes:
    """The batch in RESP, every argument already bytes (redis-py's own packer encodes and
    checks each argument: ~5 µs a command more)."""
    parts: list[bytes] = []
    for i, asking in batch:
        for cmd in (_ASKING, commands[i].args) if asking else (commands[i].args,):
            parts.append(b"*%d\r\n" % len(cmd))
            for arg in cmd:
                parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def _name(node: Any) -> str:
    return "" if node is None else str(node.name)


def _torn(exc: Exception) -> Exception:
    """A connection failure as the batch's replies say it. While a cluster client follows a
    failover it may close every connection of its nodes, ours too, under a batch on another
    thread or task (redis-py's ``aclose`` on ``CLUSTERDOWN``): the connection's socket is then
    gone mid-call (an ``AttributeError`` inside redis-py). That is a lost connection like any
    other: the commands go once more, on a fresh one."""
    if isinstance(exc, AttributeError):
        return redis.ConnectionError(f"the connection was closed under the batch ({exc})")
    return exc


def _lose(conn: Any, batch: list[tuple[int, bool]], done: int, exc: Exception,
          replies: list[Any]) -> None:  # fmt: skip
    if conn is not None:
        conn.disconnect()  # a late reply would be taken for the next batch's
    if isinstance(exc, TimeoutError) and not isinstance(exc, redis.TimeoutError):
        exc = redis.TimeoutError(str(exc))
    for i, _ in batch[done:]:
        replies[i] = exc


async def _read(conn: Any) -> Any:
    try:
        return await conn.read_response(timeout=math.inf)
    except redis.ResponseError as exc:  # an error reply: the connection stays in step
        return exc
