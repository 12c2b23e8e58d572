"""Send a batch of single-key commands to the nodes that own their keys, on redis-py's own
connections, and read the raw replies.

The hot path (the gateway's appends and reply reads, a worker's reads, results and acks) sends
few kinds of command, many at a time. On this machine redis-py's command layer and pipelines
cost about 19 µs of CPU a command, its connections sent a packed batch and read reply by reply
about 11 (``benchmarks/PROFILE.md``). So the hot path packs one batch per node, writes it at
once and reads the replies as they are (no response callbacks), while everything else stays
on redis-py's clients.

Which node owns a key is the client's business: a single-node ``Redis`` has one, a
``RedisCluster`` answers ``get_node_from_key`` from its slot table. When a node answers with a
redirect (``MOVED`` or ``ASK``: a slot moved, a failover) or cannot be reached, the commands
concerned are sent again through the client's own command layer, which follows the redirect,
refreshes its slot table and retries as redis-py's cluster client does; the next batch goes
to the new owner. A command may thus run twice if only its reply was lost: every reader of
the streams is at-least-once.

Replies come back in the order of the commands. An error reply is an exception object in its
place, never raised, like a pipeline's ``raise_on_error=False``, so that one node's trouble
fails only the commands that went to it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.connection import AbstractConnection
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from rendezvous.bus.connection import AsyncClient as AnyAsyncClient
from rendezvous.bus.connection import Client as AnyClient

_LOST = (redis.ConnectionError, redis.TimeoutError, OSError)
"""A connection failed mid-batch: its remaining replies are lost with it."""


class Command(NamedTuple):
    """One command and the key that decides its node (a stream, a hash...)."""

    key: bytes
    args: tuple[bytes, ...]


def command(*args: bytes, key_at: int = 1) -> Command:
    """A command whose key is its argument ``key_at`` (XADD, XACK, HSET...: the first)."""
    return Command(args[key_at], args)


def is_cluster(client: AnyClient | AnyAsyncClient) -> bool:
    return isinstance(client, redis.RedisCluster | aioredis.RedisCluster)


def slot_of(client: AnyClient | AnyAsyncClient, key: bytes) -> int:
    """The key's cluster slot; 0 for every key of a single node, where any keys mix."""
    if isinstance(client, redis.RedisCluster | aioredis.RedisCluster):
        return client.keyslot(key)
    return 0


def _redirected(reply: Any) -> bool:
    return isinstance(reply, AskError | TryAgainError | ClusterDownError)


def _group(commands: Sequence[Command], node_of: Any) -> dict[Any, list[int]]:
    by_node: dict[Any, list[int]] = {}
    for i, cmd in enumerate(commands):
        by_node.setdefault(node_of(cmd.key), []).append(i)
    return by_node


class Router:
    """For asyncio (the gateway). Safe for concurrent batches: each borrows its connections."""

    def __init__(self, client: AnyAsyncClient, *, timeout_s: float | None):
        self.client = client
        self.timeout_s = timeout_s
        self._cluster = isinstance(client, aioredis.RedisCluster)
        self._closed = False

    async def execute(
        self, commands: Sequence[Command], *, timeout_s: float | None = None
    ) -> list[Any]:
        """The replies of ``commands`` in order; ``timeout_s`` overrides the router's own for
        this batch (a blocking read adds its block time)."""
        if self._closed:
            return [redis.ConnectionError("this router was closed")] * len(commands)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        replies: list[Any] = [None] * len(commands)
        if not self._cluster:
            await self._node_batch(None, commands, range(len(commands)), replies, timeout_s)
        else:
            try:
                by_node = _group(commands, self._node_of)
            except redis.RedisError as exc:  # no slot table yet, a slot not covered
                by_node = {}
                replies = [exc] * len(commands)
            await asyncio.gather(
                *(self._node_batch(node, commands, idx, replies, timeout_s)
                  for node, idx in by_node.items())
            )  # fmt: skip
        redo = [i for i, reply in enumerate(replies) if _redirected(reply)]
        if redo and self._cluster:
            again = await asyncio.gather(
                *(self._through_client(commands[i], timeout_s) for i in redo)
            )
            for i, reply in zip(redo, again, strict=True):
                replies[i] = reply
        return replies

    def _node_of(self, key: bytes) -> Any:
        assert isinstance(self.client, aioredis.RedisCluster)
        return self.client.get_node_from_key(key)  # type: ignore[arg-type]  # bytes work

    async def _node_batch(
        self,
        node: Any,
        commands: Sequence[Command],
        idx: Sequence[int],
        replies: list[Any],
        timeout_s: float | None,
    ) -> None:
        if node is None:
            assert isinstance(self.client, aioredis.Redis)
            conn = await self.client.connection_pool.get_connection()
        else:
            conn = node.acquire_connection()
        done = 0
        try:
            async with asyncio.timeout(timeout_s):
                await conn.send_packed_command(
                    conn.pack_commands([commands[i].args for i in idx]), check_health=False
                )
                for i in idx:
                    replies[i] = await _read(conn)
                    done += 1
        except (*_LOST, TimeoutError) as exc:
            await conn.disconnect()  # a late reply would be taken for the next batch's
            lost = (
                redis.TimeoutError(f"Redis did not answer in {timeout_s}s")
                if isinstance(exc, TimeoutError)
                else exc
            )
            for i in idx[done:]:
                replies[i] = lost
            if not isinstance(exc, TimeoutError) and not self._closed:
                # A connection that died quietly (Redis restarted) fails its first use, and on
                # a cluster the node may be gone (a failover): the commands go again through
                # the client, which reconnects, retries and finds the slot's owner.
                for i in idx[done:]:
                    replies[i] = await self._through_client(commands[i], timeout_s)
        finally:
            if node is None:
                assert isinstance(self.client, aioredis.Redis)
                await self.client.connection_pool.release(conn)
            else:
                node.release(conn)

    async def _through_client(self, cmd: Command, timeout_s: float | None) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await self.client.execute_command(*cmd.args, NEVER_DECODE=True)
        except TimeoutError:
            return redis.TimeoutError(f"Redis did not answer in {timeout_s}s")
        except redis.RedisError as exc:
            return exc

    async def close(self) -> None:
        """Drop every connection, a blocked read's too (it fails at once, and so does every
        later batch)."""
        self._closed = True
        if isinstance(self.client, aioredis.RedisCluster):
            for node in self.client.get_nodes():
                await node.disconnect()
        else:
            await self.client.connection_pool.disconnect(inuse_connections=True)


async def _read(conn: AsyncConnection) -> Any:
    try:
        return await conn.read_response(timeout=math.inf)
    except redis.ResponseError as exc:  # an error reply: the connection stays in step
        return exc


class BlockingRouter:
    """The same for a synchronous process (model workers, the log bin); not thread-safe, like
    the loop that owns it."""

    def __init__(self, client: AnyClient, *, timeout_s: float | None):
        self.client = client
        self.timeout_s = timeout_s
        self._cluster = isinstance(client, redis.RedisCluster)

    def execute(self, commands: Sequence[Command], *, timeout_s: float | None = None) -> list[Any]:
        """As ``Router.execute``. The batches of every node are written before any reply is
        read, so the nodes work on them at the same time."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        replies: list[Any] = [None] * len(commands)
        try:
            by_node = _group(commands, self._node_of)
        except redis.RedisError as exc:
            return [exc] * len(commands)
        sent: list[tuple[Any, AbstractConnection, list[int]]] = []
        try:
            for node, idx in by_node.items():
                pool = self._pool(node)
                conn = pool.get_connection()
                sent.append((pool, conn, idx))
                try:
                    conn.send_packed_command(
                        conn.pack_commands([commands[i].args for i in idx]), check_health=False
                    )
                except _LOST as exc:
                    self._lost(conn, commands, idx, 0, exc, replies, timeout_s)
                    idx.clear()
            for _, conn, idx in sent:
                for done, i in enumerate(idx):
                    try:
                        replies[i] = conn.read_response(timeout=timeout_s)
                    except redis.ResponseError as exc:
                        replies[i] = exc
                    except _LOST as exc:
                        self._lost(conn, commands, idx, done, exc, replies, timeout_s)
                        break
        finally:
            for pool, conn, _ in sent:
                pool.release(conn)
        redo = [i for i, reply in enumerate(replies) if _redirected(reply)]
        if redo and self._cluster:
            for i in redo:
                replies[i] = self._through_client(commands[i])
        return replies

    def _node_of(self, key: bytes) -> Any:
        if isinstance(self.client, redis.RedisCluster):
            return self.client.get_node_from_key(key)
        return None

    def _pool(self, node: Any) -> Any:
        if isinstance(self.client, redis.RedisCluster):
            return self.client.get_redis_connection(node).connection_pool
        return self.client.connection_pool

    def _lost(
        self,
        conn: AbstractConnection,
        commands: Sequence[Command],
        idx: Sequence[int],
        done: int,
        exc: Exception,
        replies: list[Any],
        timeout_s: float | None,
    ) -> None:
        conn.disconnect()  # a late reply would be taken for the next batch's
        for i in idx[done:]:  # as in ``Router``: again through the client, unless it hung
            replies[i] = (
                exc if isinstance(exc, redis.TimeoutError) else self._through_client(commands[i])
            )

    def _through_client(self, cmd: Command) -> Any:
        try:
            return self.client.execute_command(*cmd.args, NEVER_DECODE=True)
        except redis.RedisError as exc:
            return exc

    def close(self) -> None:
        if isinstance(self.client, redis.RedisCluster):
            for node in self.client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()
        else:
            self.client.connection_pool.disconnect()
