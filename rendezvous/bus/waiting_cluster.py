"""redis-py's asyncio cluster client, with a bound on the commands in flight that waits.

redis-py's single-node client has a pool that waits for a free connection
(``BlockingConnectionPool``); its cluster client has none: past ``max_connections`` on a node
a command fails at once (``MaxConnectionsError``). A gateway process serving a burst of job
polls or readiness probes then answered 503 from a healthy cluster. Here every command and
pipeline of the client takes a turn of a semaphore first, waiting for one up to the client's
timeout; the nodes allow a few more connections than there are turns (a redirect may take a
second connection), so the library's own bound is never what a caller meets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline

SPARE_CONNECTIONS = 16
"""Connections each node allows beyond the turns: a redirected command's second."""

_HOLDING: ContextVar[bool] = ContextVar("rdv_redis_turn", default=False)
"""Set while a task holds a turn: a command that redis-py sends from inside another (a
pipeline's retry, a split command) is part of it and takes no second turn."""


class Turns:
    """At most ``count`` commands at once; the next waits up to ``wait_s``."""

    def __init__(self, count: int, wait_s: float | None):
        self.count = count
        self.wait_s = wait_s
        self._free = asyncio.Semaphore(count)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self.wait_s):
                await self._free.acquire()
        except TimeoutError:
            raise redis.ConnectionError(
                f"no Redis connection free in {self.wait_s}s: {self.count} commands of this "
                "process were in flight (RDV_REDIS_MAX_CONNECTIONS)"
            ) from None
        token = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self._free.release()


class WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that takes one of its client's turns to run."""

    def __init__(self, client: WaitingRedisCluster, transaction: Any | None = None):
        super().__init__(client, transaction)
        self.turns = client.turns

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        if self.turns is None:
            return await super().execute(raise_on_error, allow_redirections)
        async with self.turns.turn():
            return await super().execute(raise_on_error, allow_redirections)


class WaitingRedisCluster(aioredis.RedisCluster):
    """``RedisCluster`` whose commands and pipelines wait for one of ``turns``."""

    turns: Turns | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.turns is None:
            return await super().execute_command(*args, **kwargs)
        async with self.turns.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused there, as ever
        return WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py's own
