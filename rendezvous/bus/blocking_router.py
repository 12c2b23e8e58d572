"""The hot path's command router for a synchronous process (model workers, the log bin): a
batch of single-key commands written to the nodes that own their keys, on connections the
router keeps, and the raw replies read back in order.

What a batch is, where each command goes and which replies send it once more is shared with
the gateway's router (``rendezvous.bus.async_router``) and said in ``rendezvous.bus.routing``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import TryAgainError
from redis.utils import SENTINEL

from rendezvous.bus import routing
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.failures import REDIS_FAILURES, refused_for_a_while
from rendezvous.bus.routing import Command, Plan

log = logging.getLogger(__name__)


class BlockingRouter:
    """For a synchronous process (model workers, the log bin); not thread-safe, like the loop
    that owns it."""

    def __init__(self, client: AnyClient, *, timeout_s: float | None):
        self.client = client
        self.timeout_s = timeout_s
        """The client's socket timeout: reads use it unless a batch says otherwise."""
        self._conns: dict[str, Any] = {}
        self._ids: dict[str, _ClientId] = {}
        """Each kept connection's Redis client id, for ``unblock``."""
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
        self._run(routing.route(self.client, commands, range(len(commands)), replies), commands,
                  replies, timeout_s)  # fmt: skip
        again = [i for i, reply in enumerate(replies) if routing.goes_again(reply)]
        if again:
            if any(isinstance(replies[i], TryAgainError) for i in again):
                time.sleep(routing.TRYAGAIN_PAUSE_S)
            self._follow(commands, again, replies)
            plan = routing.route(self.client, commands, again, replies)
            self._run(plan, commands, replies, timeout_s)
        if isinstance(self.client, redis.RedisCluster):
            stalled = [i for i, reply in enumerate(replies) if routing.timed_out(reply)]
            if stalled:  # look for a new owner of their slots, without waiting for it
                self._search_for(routing.keys_to_follow(self.client, commands, stalled, replies))
        return replies

    def _follow(
        self, commands: Sequence[Command], again: Sequence[int], replies: list[Any]
    ) -> None:
        """Let the cluster client follow what the nodes said, one key per slot; after a lost
        node, for at most ``LOST_NODE_WAIT_S`` (its search goes on in the background)."""
        if not isinstance(self.client, redis.RedisCluster):
            return
        keys = routing.keys_to_follow(self.client, commands, again, replies)
        if not any(routing.node_lost(replies[i]) for i in again):  # a redirect: answered at once
            self._follow_keys(keys)
            return
        search = self._search_for(keys)  # None: one is under way, and this batch fails at once
        if search is not None:
            search.join(routing.LOST_NODE_WAIT_S)

    def _search_for(self, keys: Sequence[bytes]) -> threading.Thread | None:
        """Start the cluster client's search for these keys' owners, unless one runs."""
        if self._search is not None and self._search.is_alive():
            return None
        self._search = threading.Thread(target=self._follow_keys, args=(keys, routing.SEARCH_S),
                                        name="rdv-cluster-search", daemon=True)  # fmt: skip
        self._search.start()
        return self._search

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
                    time.sleep(routing.SEARCH_PAUSE_S)

    def _run(self, plan: Plan, commands: Sequence[Command], replies: list[Any],
             timeout_s: float | None) -> None:  # fmt: skip
        sent: list[tuple[Any, list[tuple[int, bool]]]] = []
        # A timeout that is the connection's own needs no per-read setting (two syscalls).
        read_timeout: Any = timeout_s if timeout_s != self.timeout_s else SENTINEL
        for node, batch in plan.items():
            packed = routing.pack(commands, batch)
            try:
                conn = self._connection(node)
                conn.send_packed_command([packed], check_health=False)
            except routing.CONNECTION_FAILURES as exc:
                _lose(
                    self._conns.get(routing.node_name(node)), batch, 0, routing.torn(exc), replies
                )
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
                except routing.CONNECTION_FAILURES as exc:
                    _lose(conn, batch, done, routing.torn(exc), replies)
                    break

    def _connection(self, node: Any) -> Any:
        """This router's own connection to ``node``, made once and kept (a pool's check on
        every borrow cost more than the commands), from the settings of the node's pool but
        out of the pool: while the cluster client follows a failover it disconnects its pools
        (from the search thread too), which must not cut this router's batches to nodes still
        up. A connection that failed is reopened by its next command."""
        name = routing.node_name(node)
        conn = self._conns.get(name)
        if conn is None:
            pool = self._pool(node)
            conn = pool.connection_class(**pool.connection_kwargs)
            self._ids[name] = ident = _ClientId(pool)
            conn.register_connect_callback(ident.learn)
            self._conns[name] = conn
        return conn

    def _pool(self, node: Any) -> Any:
        if isinstance(self.client, redis.RedisCluster):
            return self.client.get_redis_connection(node).connection_pool
        return self.client.connection_pool

    def unblock(self) -> None:
        """From another thread: end a blocking read of this router's at once, as if its time
        had run out (``CLIENT UNBLOCK``, on a connection of its own), so that a process asked
        to stop need not wait out the block. A read sent after this blocks its full time."""
        for ident in list(self._ids.values()):
            if ident.value is not None:
                ident.unblock()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()
        self._conns.clear()
        self._ids.clear()


class _ClientId:
    """The Redis client id of one kept connection, learnt on every (re)connect: one
    ``CLIENT ID`` round trip a connection, not a request."""

    def __init__(self, pool: Any):
        self.pool = pool
        self.value: int | None = None

    def learn(self, conn: Any) -> None:
        """redis-py's connect callback (it must be a method: redis-py keeps a weak one). An
        ACL user without ``CLIENT ID`` is served all the same, without ``unblock``."""
        conn.send_command("CLIENT", "ID", check_health=False)
        try:
            self.value = int(conn.read_response())
        except redis.ResponseError as exc:  # NOPERM, or a managed Redis that renamed it
            if refused_for_a_while(exc):  # BUSY: for now, not for this connection's life
                raise
            self.value = None
            log.info("no CLIENT ID (%s): a stop waits out its blocking read", exc)

    def unblock(self) -> None:
        conn = self.pool.connection_class(**self.pool.connection_kwargs)
        try:
            conn.send_command("CLIENT", "UNBLOCK", self.value)
            conn.read_response()
        except redis.RedisError as exc:  # Redis away (nothing to cut short), or NOPERM
            if isinstance(exc, redis.ResponseError):
                self.value = None  # not again
            log.info("CLIENT UNBLOCK %s failed (%s): the read runs out its block", self.value, exc)
        finally:
            conn.disconnect()


def _lose(conn: Any, batch: list[tuple[int, bool]], done: int, exc: Exception,
          replies: list[Any]) -> None:  # fmt: skip
    if conn is not None:
        conn.disconnect()  # a late reply would be taken for the next batch's
    if isinstance(exc, TimeoutError) and not isinstance(exc, redis.TimeoutError):
        exc = redis.TimeoutError(str(exc))
    for i, _ in batch[done:]:
        replies[i] = exc
