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

import logging
from collections.abc import Mapping
from typing import Any

import redis

log = logging.getLogger(__name__)

PROBE_SCRIPT = "return 1"
PROBE_KEY = "rdv:probe"
"""Named by the probe script (so that a cluster client knows where to send it), never read
or written."""


class RedisUnfit(ValueError):
    """The Redis given cannot carry the system; the message says what to change."""


def no_scripts(exc: Exception) -> RedisUnfit:
    return RedisUnfit(
        f"Redis refused a script ({exc}): the gateway, workers and log bin need EVAL and "
        "EVALSHA (grant the user +@scripting)"
    )


def refused_for_good(exc: Exception) -> bool:
    """A command refused for good: a user without it, or renamed away. (Redis full, its disk
    full or a replica refuse a script for a while: the requests' own paths answer 503.)"""
    return isinstance(exc, redis.exceptions.NoPermissionError) or "unknown command" in str(exc)


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
        log.warning("cannot read INFO memory (this user may not run INFO): Redis's memory "
                    "limit and eviction policy go unchecked; keep maxmemory-policy "
                    "noeviction")  # fmt: skip
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
        if refused_for_good(exc):
            raise no_scripts(exc) from None
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
        if refused_for_good(exc):
            raise no_scripts(exc) from None
    try:
        info = await client.info("memory", **_every_node(client))
    except redis.exceptions.ResponseError:
        info = None
    return judged(info, allow_eviction)
