"""The hot path's command router for asyncio (the gateway): a batch of single-key commands
written to the nodes that own their keys, on connections the router keeps, and the raw replies
read back in order; concurrent batches share the connections.

What a batch is, where each command goes and which replies send it once more is shared with
the synchronous processes' router (``rendezvous.bus.blocking_router``) and said in
``rendezvous.bus.routing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import TryAgainError

from rendezvous.bus import routing
from rendezvous.bus.connection import AsyncClient as AnyAsyncClient
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.routing import Command, Plan


class Router:
    """``BlockingRouter``'s counterpart for asyncio (the gateway). Concurrent batches take
    turns on each node's connection; the nodes of one batch are sent and read at the same
    time."""

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
        first = routing.route(self.client, commands, range(len(commands)), replies)
        await self._run(first, commands, replies, timeout_s)
        again = [i for i, reply in enumerate(replies) if routing.goes_again(reply)]
        if again and not self._closed:
            if any(isinstance(replies[i], TryAgainError) for i in again):
                await asyncio.sleep(routing.TRYAGAIN_PAUSE_S)
            await self._follow(commands, again, replies)
            await self._run(
                routing.route(self.client, commands, again, replies), commands, replies, timeout_s
            )
        if isinstance(self.client, aioredis.RedisCluster) and not self._closed:
            stalled = [i for i, reply in enumerate(replies) if routing.timed_out(reply)]
            if stalled:  # look for a new owner of their slots, without waiting for it
                self._search_for(routing.keys_to_follow(self.client, commands, stalled, replies))
        return replies

    async def _follow(
        self, commands: Sequence[Command], again: Sequence[int], replies: list[Any]
    ) -> None:
        if not isinstance(self.client, aioredis.RedisCluster):
            return
        keys = routing.keys_to_follow(self.client, commands, again, replies)
        if not any(routing.node_lost(replies[i]) for i in again):  # a redirect: answered at once
            await self._follow_keys(keys)
            return
        search = self._search_for(keys)  # None: one is under way, and this batch fails at once
        if search is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(search), routing.LOST_NODE_WAIT_S)

    def _search_for(self, keys: Sequence[bytes]) -> asyncio.Task[None] | None:
        """Start the cluster client's search for these keys' owners, unless one runs."""
        if self._search is not None and not self._search.done():
            return None
        self._search = asyncio.get_running_loop().create_task(
            self._follow_keys(keys, routing.SEARCH_S)
        )
        return self._search

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
                    await asyncio.sleep(routing.SEARCH_PAUSE_S)

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
        name = routing.node_name(node)
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        async with lock:  # one batch at a time on the node's connection: replies in order
            done = 0
            conn = None
            packed = routing.pack(commands, batch)
            try:
                conn = await self._connection(node)
                async with asyncio.timeout(timeout_s):
                    await conn.send_packed_command([packed], check_health=False)
                    for i, asking in batch:
                        if asking:
                            await _read(conn)
                        replies[i] = await _read(conn)
                        done += 1
            except routing.CONNECTION_FAILURES as exc:
                if conn is not None:
                    await conn.disconnect()  # a late reply would be taken for the next batch's
                lost = (redis.TimeoutError(f"Redis did not answer in {timeout_s}s")
                        if isinstance(exc, TimeoutError) else routing.torn(exc))  # fmt: skip
                for i, _ in batch[done:]:
                    replies[i] = lost

    async def _connection(self, node: Any) -> Any:
        """As ``BlockingRouter._connection``: made once and kept."""
        name = routing.node_name(node)
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


async def _read(conn: Any) -> Any:
    try:
        return await conn.read_response(timeout=math.inf)
    except redis.ResponseError as exc:  # an error reply: the connection stays in step
        return exc
