"""What the hot path's command routers share: a batch of single-key commands, which node each
goes to, the batch in RESP, and which replies send a command once more. The routers that send
batches this way are ``rendezvous.bus.blocking_router`` (a synchronous process: model workers,
the log bin) and ``rendezvous.bus.async_router`` (asyncio: the gateway); this module says what
they do alike.

They send a batch of single-key commands to the nodes that own their keys, on redis-py's own
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
at-least-once. A timeout is not retried (it would double the caller's wait), but on a cluster it
starts the same background search as a lost node (``timed_out``): a master that hangs rather than
dies is replaced by the election all the same, and the slot table must learn it.

Replies come back in the order of the commands. An error reply is an exception object in its
place, never raised, like a pipeline's ``raise_on_error=False``, so that one node's trouble
fails only the commands that went to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from rendezvous.bus.connection import AsyncClient as AnyAsyncClient
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.failures import REDIS_FAILURES

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


CONNECTION_FAILURES: tuple[type[Exception], ...] = (*REDIS_FAILURES, AttributeError)
"""What a batch's connection may fail with: Redis's failures, and a socket closed under it
(see ``torn``)."""


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


def goes_again(reply: Any) -> bool:
    """Worth one more try, after following the cluster (a timeout is not: see the module)."""
    if isinstance(reply, redis.TimeoutError):
        return False
    return isinstance(
        reply, AskError | TryAgainError | ClusterDownError | redis.ConnectionError
    ) or unblocked(reply)


def unblocked(reply: Any) -> bool:
    """A blocking read ended by its node's change of role (``UNBLOCKED ... instance state
    changed``: a manual ``CLUSTER FAILOVER`` made it a replica): read again from the new
    master. (Any other ``UNBLOCKED``, such as a stream deleted under the read, goes again too,
    and the read says what is wrong.)"""
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("UNBLOCKED")


def timed_out(reply: Any) -> bool:
    """The node did not answer in time: it may have stalled for good (a hung host, a network
    that drops its packets) while the cluster elects its replica. Not tried again now (that
    would double the caller's wait), but the cluster client is sent to look for the slot's
    owner in the background, so that the batches after the election go to the new master
    instead of the stalled one for as long as it stalls."""
    return isinstance(reply, redis.TimeoutError | TimeoutError)


def node_lost(reply: Any) -> bool:
    """The command's node is gone or its cluster is electing: finding the new owner may take
    as long as a failover does."""
    return isinstance(reply, redis.ConnectionError | ClusterDownError)


def _asked(reply: Any) -> bool:
    return isinstance(reply, AskError) and not isinstance(reply, MovedError)


Plan = dict[Any, list[tuple[int, bool]]]
"""node (None: the single node) -> (command index, preceded by ASKING) in the order sent."""


def route(
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


def keys_to_follow(
    cluster: redis.RedisCluster | aioredis.RedisCluster,
    commands: Sequence[Command],
    again: Sequence[int],
    replies: list[Any],
) -> list[bytes]:
    """One key of each slot whose commands were refused other than by ``ASK``."""
    keys = {cluster.keyslot(commands[i].key): commands[i].key
            for i in again if not _asked(replies[i])}  # fmt: skip
    return list(keys.values())


def pack(commands: Sequence[Command], batch: list[tuple[int, bool]]) -> bytes:
    """The batch in RESP, every argument already bytes (redis-py's own packer encodes and
    checks each argument: ~5 µs a command more)."""
    parts: list[bytes] = []
    for i, asking in batch:
        for cmd in (_ASKING, commands[i].args) if asking else (commands[i].args,):
            parts.append(b"*%d\r\n" % len(cmd))
            for arg in cmd:
                parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def node_name(node: Any) -> str:
    """The key of a router's own connection (and lock) to ``node``."""
    return "" if node is None else str(node.name)


def torn(exc: Exception) -> Exception:
    """A connection failure as the batch's replies say it. While a cluster client follows a
    failover it may close every connection of its nodes, ours too, under a batch on another
    thread or task (redis-py's ``aclose`` on ``CLUSTERDOWN``): the connection's socket is then
    gone mid-call (an ``AttributeError`` inside redis-py). That is a lost connection like any
    other: the commands go once more, on a fresh one."""
    if isinstance(exc, AttributeError):
        return redis.ConnectionError(f"the connection was closed under the batch ({exc})")
    return exc
