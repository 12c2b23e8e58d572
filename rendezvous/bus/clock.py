"""Time that hosts agree on: Redis's clock, not each process's own.

Gateways and workers may run on hosts whose wall clocks differ by hundreds of milliseconds or
seconds (a resumed VM, a host without NTP). Comparing one host's epoch time with another's
then misjudges by the skew: a worker 1 s ahead of the gateway found every request of a 1 s
timeout already past its deadline (all 504s), and a worker 5 s behind was judged dead.

So what crosses hosts is judged on Redis's clock. A stream entry's id is the Redis time of its
XADD; ``TIME`` riding in the same round trip as a read (no round trip of its own) says the
Redis time of that read. A request's remaining time is a duration taken on one host (the
gateway's ``deadline_ms`` less the time it sent the XADD, or built the envelope), so old
envelopes read the same. On a Redis Cluster each node stamps ids by its own clock: the nodes'
clocks are assumed to agree (see the README's "Clock skew").
"""

from __future__ import annotations

import time
from typing import Any

from rendezvous.bus.routing import Command


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id Redis made (``ms-seq``) as a pair that sorts as Redis orders them."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def time_command(key: bytes) -> Command:
    """``TIME``, routed to ``key``'s node (on a cluster, the deployment's own node; entry ids
    of partitions on other nodes are compared with it too, so the nodes' clocks are assumed to
    agree)."""
    return Command(key, (b"TIME",))


def redis_ms(reply: Any) -> float | None:
    """Epoch milliseconds from a ``TIME`` reply (seconds, microseconds; redis-py may have made
    it a tuple of ints already); None for anything else (a node away)."""
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        return None
    try:
        return int(reply[0]) * 1000 + int(reply[1]) / 1000
    except (TypeError, ValueError):
        return None


class RedisClock:
    """Redis's time as the latest ``TIME`` said it, carried on by this host's clock while no
    ``TIME`` comes (its node failing over): the offset between two clocks holds for seconds,
    and a worker that fell back to comparing its own clock with the gateway's dropped a
    surviving partition's requests as expired meanwhile (165 in a probe, 2 s ahead)."""

    def __init__(self) -> None:
        self.offset_ms: float | None = None
        """Redis's time minus this host's at the latest ``TIME``; None before the first."""

    def now_ms(self, reply: Any, local_ms: float | None = None) -> float | None:
        """Redis's time of a read, from its ``TIME`` reply, else estimated (None: never read).
        A reply that reads older than the estimate came late to this process (it was paused
        or starved while the reply waited in its socket): the estimate stands. A worker
        stopped 7 s scored the entry its read had been served, as if no time had passed
        since (a helper's probe); its deadline is judged now."""
        local = time.monotonic() * 1000 if local_ms is None else local_ms
        told = redis_ms(reply)
        estimate = None if self.offset_ms is None else local + self.offset_ms
        if told is not None:
            self.offset_ms = told - local
            return told if estimate is None else max(told, estimate)
        return estimate


def entry_ms(entry_id: bytes | str) -> int | None:
    """The Redis time (epoch ms) at which a ``*`` XADD made the entry: its id's first part."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    head, _, _ = raw.partition("-")
    return int(head) if head.isdigit() else None


ID_MS_MIDDLE = 0.5
"""An entry id holds the whole millisecond its XADD ran in (``entry_ms``), while a read's
``TIME`` has microseconds: a wait measured from the id's millisecond read 0.5 ms too long on
average (at concurrency 1 the median queue wait read 0.52 ms for reads that Redis served as the
XADD unblocked them, their ``TIME`` run just after). Measured from the middle of that
millisecond, it is right on average and never more than 0.5 ms off."""


def waited(
    entry_id: bytes | str,
    deadline_ms: float,
    enqueued_ms: float,
    bus_now_ms: float | None,
    local_now_ms: float,
) -> tuple[bool, float]:
    """(past its deadline, queue wait in ms) of a request read now.

    With Redis's time of the read (``bus_now_ms``), both are judged on Redis's clock: the wait
    is the time since the entry's XADD (``ID_MS_MIDDLE``), and the request is late once that
    exceeds the time it
    had left as the gateway sent the XADD (``deadline_ms - enqueued_ms``, where the caller
    passes the entry's send stamp as ``enqueued_ms`` when it has one, so a wait in the gateway's
    appender counts). Without (a node away), the old way: the local clock against the
    gateway's, right only while their clocks agree."""
    added_ms = entry_ms(entry_id)
    if bus_now_ms is None or added_ms is None:
        return deadline_ms < local_now_ms, local_now_ms - enqueued_ms
    wait_ms = max(bus_now_ms - added_ms - ID_MS_MIDDLE, 0.0)  # ids never go back; TIME may
    return wait_ms > deadline_ms - enqueued_ms, wait_ms


LIVE_MEMBERS = """
local t = redis.call('TIME')
local after = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.6f', after), '+inf')
"""
"""KEYS[1]: a sorted set scored by heartbeat time (epoch s, Redis's: see the worker);
ARGV[1]: a timeout in seconds. The members heard from within the timeout by Redis's clock, in
the one command a ``ZRANGEBYSCORE`` with the reader's own clock took."""


def live_members_args(key: str, timeout_s: float) -> tuple[str, int, str, str]:
    """``EVAL``'s arguments for ``LIVE_MEMBERS`` (``client.eval(*live_members_args(...))``)."""
    return LIVE_MEMBERS, 1, key, repr(float(timeout_s))
