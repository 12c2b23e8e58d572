"""Streams set aside while their node does not answer, so that one lost shard stalls only its own
streams.

On a Redis Cluster a consumer reads streams on several nodes (the log bin's deployments, a
partitioned deployment). When one node stops answering (a master lost, its replica being
elected), the commands to it fail while the others answer; ``SetAside`` reads those failures as
empty replies and leaves their streams out of reads for ``ASIDE_S`` at a time, while the other
streams are read on. A consumer whose every stream is unreachable fails its step as before
(backoff, then a fresh start). The consumer loop's reader (``rendezvous.bus.reader``) holds
one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import ClusterError, RedisClusterException

log = logging.getLogger(__name__)

ASIDE_S = 0.5
"""How long a stream whose node stopped answering is left out of the reads of a consumer that
reads other nodes too. The stream's own pending entries are re-read first once it is back."""

WARN_EVERY_S = 10.0
"""A stream still lost is logged again after this long (it is tried every ``ASIDE_S``)."""

UNREACHABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterError,
    RedisClusterException,
)
"""The replies that set a stream aside (not an error of the command itself)."""


class SetAside:
    """The streams of one consumer whose node does not answer -> when (monotonic) each is tried
    again."""

    def __init__(self, consumer: str):
        self.consumer = consumer
        self._until: dict[str, float] = {}
        self._warned: dict[str, float] = {}
        """Stream -> when its loss was last logged: once every ``WARN_EVERY_S`` at most."""

    def __bool__(self) -> bool:
        return bool(self._until)

    def __contains__(self, stream: object) -> bool:
        return stream in self._until

    def wait_s(self, block_ms: int | None) -> float:
        """Until the first stream set aside is tried again (at most a blocking read's time)."""
        wait_s = min(self._until.values(), default=0.0) - time.monotonic()
        if block_ms is not None:
            wait_s = min(wait_s, block_ms / 1000)
        return wait_s

    def reachable(self, streams: Iterable[str]) -> list[str]:
        """``streams`` less those set aside whose time has not come."""
        if not self._until:
            return list(streams)
        now = time.monotonic()
        for stream, until in list(self._until.items()):
            if until <= now:
                del self._until[stream]
        return [s for s in streams if s not in self._until]

    def tolerate(
        self, replies: list[Any], streams: Sequence[Sequence[str]], every: Iterable[str]
    ) -> tuple[list[Any], list[str]]:
        """When some of a batch's commands (each over ``streams[i]``) lost their node while
        other streams of the consumer (``every``) may still answer: their replies read as
        empty (``None``) and their streams are set aside, returned too (a lost reply may have
        delivered entries, to be re-read once back). When every stream is lost, the replies
        are left as they are, to fail the step."""
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, UNREACHABLE)]
        if not lost:
            return replies, []
        gone = {stream for i in lost for stream in streams[i]}
        if gone.issuperset(every):
            return replies, []
        until = time.monotonic() + ASIDE_S
        out = list(replies)
        now = time.monotonic()
        for i in lost:
            for stream in streams[i]:
                if now >= self._warned.get(stream, -WARN_EVERY_S) + WARN_EVERY_S:
                    self._warned[stream] = now
                    log.warning("%s: %s does not answer (%s); reading the other streams",
                                self.consumer, stream, replies[i])  # fmt: skip
                self._until[stream] = until
            out[i] = None
        return out, sorted(gone)
