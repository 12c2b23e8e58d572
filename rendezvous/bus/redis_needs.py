"""What the system needs of the Redis it is given, checked once at start (``rdv serve``,
``rdv gateway`` and each gateway process), so that a Redis that cannot carry it says so in one
line instead of failing requests later (found by a helper's probe of managed-Redis settings):

- **Scripts** (``EVAL``/``EVALSHA``): every write that must be atomic is one. A user without
  ``+@scripting`` started, said it was ready, and failed every predict with an id, every job
  and every label.
- **No eviction**: past ``maxmemory``, any ``maxmemory-policy`` but ``noeviction`` deletes
  keys the system relies on. Managed services default to ``volatile-lru``, which took accepted
  jobs, request ids (answered ids were scored again) and reply streams (504s); ``allkeys-lru``
  took the deployments and the model registry, for good. With ``noeviction`` Redis refuses
  writes instead, and predicts answer 503 until memory frees. Refused unless
  ``RDV_ALLOW_EVICTION``.
- ``INFO`` is optional (``-@dangerous`` takes it on Redis 7): without it the memory limit and
  policy go unchecked, which is said once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import redis

from rendezvous.retry_log import warn_once

log = logging.getLogger(__name__)

PROBE_SCRIPT = "return 1"
PROBE_KEYS = (
    "rdv:{probe}:stream",
    "rdv:{probe}:hash",
    "rdv:{probe}:string",
    "rdv:{probe}:zset",
    "rdv:{probe}:set",
    "rdv:{probe}:list",
)
"""The keys of the start's checks (one slot): named by the probe script, so that a cluster
client knows where to send it; made and deleted by the data commands' probe."""
PROBE_KEY = PROBE_KEYS[0]


def _data_commands(pipe: Any) -> None:
    """The data commands every process needs, queued on keys of their own (a stream and a hash,
    made and deleted): a user without one, or without the ``rdv:*`` keys, is refused at start
    naming it. Only ``EVAL`` was checked: a user without ``XADD`` made every gateway start end
    in a traceback, restarted for ever, and one without ``XACK`` said ready while predicts
    timed out (a helper's probe). Sent as commands, not in a script: Redis 6 checks no ACL
    inside one."""
    stream, table, string, zset, members, items = PROBE_KEYS
    for key in PROBE_KEYS:
        pipe.delete(key)  # one key a DEL: a cluster's pipeline takes no more
    pipe.xadd(stream, {"p": "1"}, maxlen=10)
    pipe.xgroup_create(stream, "g", id="0")
    pipe.xreadgroup("g", "c", {stream: ">"}, count=1)
    pipe.xautoclaim(stream, "g", "c", 0, "0-0", count=1)
    pipe.xclaim(stream, "g", "c", 0, ["0-1"])
    pipe.xpending(stream, "g")
    pipe.xinfo_stream(stream)
    pipe.xinfo_groups(stream)
    pipe.xinfo_consumers(stream, "g")
    pipe.xack(stream, "g", "0-1")
    pipe.xrange(stream, count=1)
    pipe.xrevrange(stream, count=1)
    pipe.xread({stream: "0-0"}, count=1)
    pipe.xlen(stream)
    pipe.xdel(stream, "0-1")
    pipe.xtrim(stream, maxlen=0)
    pipe.xgroup_delconsumer(stream, "g", "c")
    pipe.xgroup_destroy(stream, "g")
    pipe.hset(table, "f", "1")
    pipe.hsetnx(table, "g", "1")
    pipe.hget(table, "f")
    pipe.hmget(table, ["f"])
    pipe.hgetall(table)
    pipe.hincrby(table, "n", 1)
    pipe.hexists(table, "f")
    pipe.hkeys(table)
    pipe.hvals(table)
    pipe.hdel(table, "g")
    pipe.pexpire(table, 60_000)
    pipe.set(string, "1", px=60_000, nx=True)
    pipe.get(string)
    pipe.exists(string)
    pipe.expire(string, 60)
    pipe.zadd(zset, {"m": 1})
    pipe.zrangebyscore(zset, 0, 2)
    pipe.zremrangebyscore(zset, 0, 0)
    pipe.zrem(zset, "m")
    pipe.sadd(members, "m")
    pipe.sismember(members, "m")
    pipe.smembers(members)
    pipe.srem(members, "m")
    pipe.rpush(items, "1")
    pipe.lrange(items, 0, -1)
    pipe.lindex(items, -1)
    pipe.evalsha(_PROBE_SHA, 1, stream)  # the probe's EVAL put it in the script cache
    for key in PROBE_KEYS:
        # staged as a plain command: an async cluster pipeline's unlink() is a coroutine,
        # never sent (a RuntimeWarning at every gateway start, the probe keys left behind)
        pipe.execute_command("UNLINK", key)


_PROBE_SHA = hashlib.sha1(PROBE_SCRIPT.encode()).hexdigest()


def _transaction(client: Any) -> None:
    """A state change is a transaction (``WATCH``, ``MULTI``, ``EXEC``): a user without
    ``MULTI`` started, said it was ready, and answered every admin change 503 'Redis is
    unavailable: ResponseError' (redis-py's cluster transaction passes the refusal of its
    MULTI over, and EXEC then says 'EXEC without MULTI': a helper's probe)."""
    table = PROBE_KEYS[1]
    try:
        with client.pipeline(transaction=True) as tx:
            tx.watch(table)
            tx.multi()
            tx.hset(table, "t", "1")
            tx.delete(table)
            tx.execute()
    except redis.exceptions.WatchError:
        return  # another process's check touched the key meanwhile: EXEC ran, and was taken
    except redis.exceptions.ResponseError as exc:
        if "EXEC without MULTI" in str(exc):
            raise RedisUnfit(
                "Redis refused a transaction (MULTI): grant the user the data commands "
                "(+@all -@dangerous is enough)"
            ) from None
        _refusal([exc])


def _refusal(replies: list[Any]) -> None:
    """``RedisUnfit`` for a refusal for good among ``replies`` (a pipeline's, or one command's
    error); a refusal for a while is no setting to fix."""
    for reply in replies:
        if isinstance(reply, Exception) and refused_for_good(reply):
            raise no_scripts(reply) from None


class RedisUnfit(ValueError):
    """The Redis given cannot carry the system; the message says what to change."""


def no_scripts(exc: Exception) -> RedisUnfit:
    """What a refusal of the start's checks says the user lacks: a key pattern, a data
    command (named in Redis's words), or scripts."""
    said = str(exc)
    if "access a key" in said or "one of the keys" in said:
        return RedisUnfit(f"Redis refused the user the system's keys ({said}): grant it ~rdv:*")
    if "'eval'" not in said and "'evalsha'" not in said:
        return RedisUnfit(
            f"Redis refused a command the system needs ({said}): grant the user the data "
            "commands (+@all -@dangerous is enough)"
        )
    return RedisUnfit(
        f"Redis refused a script ({said}): the gateway, workers and log bin need EVAL and "
        "EVALSHA (grant the user +@scripting)"
    )


def refused_for_good(exc: Exception) -> bool:
    """A command refused for good: a user without it, or renamed away (also inside a script,
    whose error carries Redis's own). (Redis full, its disk full or a replica refuse a script
    for a while: the requests' own paths answer 503.)"""
    said = str(exc)
    return (
        isinstance(exc, redis.exceptions.NoPermissionError)
        or "NOPERM" in said
        or "unknown command" in said.lower()
    )


def eviction_problem(info: Mapping[str, Any]) -> str | None:
    """Why ``INFO memory``'s limit and policy would let Redis delete the system's keys."""
    limit = int(info.get("maxmemory", 0) or 0)
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if not limit or policy == "noeviction":
        return None
    taken = "accepted jobs, request ids and reply streams"
    if policy.startswith("allkeys"):
        taken = "deployments, the model registry, " + taken
    return (
        f"Redis's maxmemory-policy is {policy} (maxmemory {limit // 2**20} MB): once full it "
        f"deletes keys this system needs ({taken}), where noeviction refuses writes and "
        "predicts answer 503 until memory frees. Set maxmemory-policy noeviction (on a managed "
        "Redis, in its parameter group), or RDV_ALLOW_EVICTION=true to run regardless"
    )


def _every_node(client: Any) -> dict[str, Any]:
    """``INFO``'s arguments that ask every primary of a cluster (else the default node alone,
    or, on Redis 7, replies by node that read as no limit at all)."""
    return {"target_nodes": client.PRIMARIES} if hasattr(client, "get_primaries") else {}


def _per_node(reply: Any) -> list[Mapping[str, Any]]:
    """``INFO memory`` as one mapping a node: a cluster client's answer is keyed by node."""
    if isinstance(reply, Mapping) and reply and all(isinstance(v, Mapping) for v in reply.values()):
        return list(reply.values())
    return [reply]


def judged(reply: Any, allow_eviction: bool) -> Mapping[str, Any] | None:
    """The first node's ``INFO memory`` (None: unreadable), after refusing (or, allowed,
    warning of) an evicting policy on any node."""
    if reply is None:
        warn_once(log, "unchecked", "cannot read INFO memory (this user may not run INFO): "
                  "Redis's memory limit and eviction policy go unchecked; keep "
                  "maxmemory-policy noeviction")  # fmt: skip
        return None
    infos = _per_node(reply)
    for info in infos:
        problem = eviction_problem(info)
        if problem is not None:
            if not allow_eviction:
                raise RedisUnfit(problem)
            log.warning("%s (allowed by RDV_ALLOW_EVICTION)", problem)
            break
    return infos[0]


def check(client: Any, *, allow_eviction: bool) -> Mapping[str, Any] | None:
    """Check a synchronous client's Redis; returns its ``INFO memory`` (None: unreadable)."""
    try:
        client.eval(PROBE_SCRIPT, 1, PROBE_KEY)
    except redis.exceptions.ResponseError as exc:
        _refusal([exc])
    pipe = client.pipeline(transaction=False)
    _data_commands(pipe)
    _refusal(pipe.execute(raise_on_error=False))
    _transaction(client)
    try:
        client.time()  # Redis's clock (``rendezvous.bus.clock``): no key, so not in a pipeline
    except redis.exceptions.ResponseError as exc:
        _refusal([exc])
    try:
        info = client.info("memory", **_every_node(client))
    except redis.exceptions.ResponseError:
        info = None
    return judged(info, allow_eviction)


async def check_async(client: Any, *, allow_eviction: bool) -> Mapping[str, Any] | None:
    """``check`` for an asyncio client."""
    try:
        await client.eval(PROBE_SCRIPT, 1, PROBE_KEY)
    except redis.exceptions.ResponseError as exc:
        _refusal([exc])
    pipe = client.pipeline(transaction=False)
    _data_commands(pipe)
    _refusal(await pipe.execute(raise_on_error=False))
    try:
        await client.time()
    except redis.exceptions.ResponseError as exc:
        _refusal([exc])
    try:
        info = await client.info("memory", **_every_node(client))
    except redis.exceptions.ResponseError:
        info = None
    return judged(info, allow_eviction)
