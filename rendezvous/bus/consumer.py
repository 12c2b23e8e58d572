"""One consumer loop over Redis stream consumer groups, for the model worker and the log bin.

Both read input streams through a consumer group and both must lose nothing: an entry stays
pending until its consumer acks it, and what a step reads (own pending entries first after a
start or a failure, a dead consumer's idle entries claimed, then new ones, per slot on a
cluster) is said in ``rendezvous.bus.reader``. Around that, the loop: a backoff on Redis errors,
the heartbeat's timer, a wait after a short read so that the next batch gathers more, a drain
(tests, replays) and a stop. A loop may read several groups over its streams (``join``: a
worker host's shadow roles of a deployment) in the same round trips.

A subclass supplies only what differs: which streams are read (``streams_to_read``), what a
batch is processed into, what is acked when and what the heartbeat carries (``process``: the
acks and the heartbeat ride in the subclass's own write, once its work is safe), and which
failures it rides out (``failed``).

Round trips are the currency of this design, and the loop adds none. A step is one read round
trip through a ``BlockingRouter`` (raw replies on redis-py's connections, no command layer);
only after a start or a failure does a read of the consumer's own pending entries, and once per
claim interval an XAUTOCLAIM page per stream, come before it. The commands a subclass needs
answered with every read (the worker's deployment revision) ride in that same round trip
(``read_along``). The subclass writes results, acks and heartbeat in one more (through
``bus``), or hands them to ``write_with_next_read``: they then go ahead of the next read in its
round trip, so that at moderate load, where a read brings one or two entries, a batch costs one
round trip rather than two. Redis runs them before the read blocks, so they take effect as soon
as they would alone; only their replies come back with the read's. (On a cluster a blocking
read goes without: a redirected write must be sent again at once, not after the block.)
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import redis

from rendezvous.bus import group_reads
from rendezvous.bus.aside import SetAside
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.failures import REDIS_DOWN, refused_for_a_while
from rendezvous.bus.group_reads import Batch, Entry, Membership
from rendezvous.bus.reader import GroupReader
from rendezvous.bus.routing import Command, command
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)


BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.25
"""The longest pause between tries while Redis is away. A consumer must be reading again well
within a request's timeout (1 s by default) of Redis's return: at 1 s, requests accepted just
after a restart timed out while the workers were still pausing. A try costs one failed connect."""

__all__ = ["Batch", "ConsumerLoop", "Entry", "Membership", "stop_thread"]


class ConsumerLoop(ABC):
    """Reads batches from ``group`` as ``consumer`` (or, after ``join``, from several groups
    in the same round trips); a subclass processes and acks them."""

    def __init__(
        self,
        client: AnyClient,
        *,
        group: str,
        consumer: str,
        batch_size: int,
        block_ms: int,
        claim_idle_ms: int,
        heartbeat_s: float,
        read_along: Sequence[Command] = (),
        create_groups: bool = False,
        timeout_s: float | None = None,
        member: Membership | None = None,
    ):
        """``member``: the first group's membership, when the subclass keeps it (a worker's
        role); else one is made of ``group`` and ``consumer``."""
        self.client = client
        self.group = group
        self.consumer = consumer
        self.retry_log = RetryLog(log, consumer)
        """Says what fails while ``run`` rides it out, without a line at every try."""
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.heartbeat_s = heartbeat_s
        self.create_groups = create_groups
        """Create the group on every stream read (and again when it vanished, as after a
        Redis restart without persistence); else a missing group is the subclass's failure."""
        self.batch_wait_s = 0.0
        """Wait after a short read before the next blocking one (``drain`` never waits)."""
        member = member or Membership(group, consumer)
        self.reader = GroupReader(client, member, batch_size=batch_size,
                                  claim_idle_ms=claim_idle_ms, read_along=read_along,
                                  timeout_s=timeout_s, wait=self._wait)  # fmt: skip
        self.bus = self.reader.bus
        """Every read goes through this; the subclass may write through it too."""
        self._next_heartbeat = 0.0
        self._read_after = 0.0
        """Monotonic time before which the next blocking read waits (gathering a batch)."""
        self._pause: Callable[[float], object] = time.sleep
        """How that wait is spent: ``stop.wait`` under ``run``, so a stop cuts it short."""
        self.stepped_at = time.time()
        """When ``run`` last began a step (epoch s): what its process's liveness reports."""

    @property
    def members(self) -> list[Membership]:
        """The groups read, each with its consumer and its own progress."""
        return self.reader.members

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams being read now."""
        return self.reader.streams

    @property
    def aside(self) -> SetAside:
        """Streams left out of reads while their node does not answer."""
        return self.reader.aside

    # -- what a subclass supplies -------------------------------------------------------------

    @abstractmethod
    def streams_to_read(self) -> Sequence[str]:
        """Called first in every step: the stream keys to read now."""

    def makes_stream(self, stream: str) -> bool:
        """Whether creating the group may create ``stream`` (``create_groups``): not one that
        was purged, which a stale publisher must find gone."""
        return True

    def group_vanished(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """A read met a group gone (a Redis restart without persistence, or a purge): a
        subclass that caches what it reads may look again before groups are made anew."""

    @abstractmethod
    def process(self, batch: Batch) -> int:
        """Handle what a step read, possibly nothing (and publish the heartbeat when
        ``heartbeat_due`` says so); returns the entries handled. An entry stays pending, and is
        read again after a restart or a failure, until this acks it."""

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        """``run`` caught ``exc`` from a step: True to retry in ``retry_in_s`` (after
        re-reading our pending entries), False to stop; anything else, raise it. This default
        rides out Redis outages and Redis refusing commands for a while
        (``refused_for_a_while``) only."""
        if isinstance(exc, REDIS_DOWN):
            self.retry_log.failed(f"redis unavailable ({exc})", retry_in_s)
            return True
        if refused := refused_for_a_while(exc):
            self.retry_log.failed(refused, retry_in_s)
            return True
        raise exc

    def close(self) -> None:
        """Called once when ``run`` ends; a subclass extends it to release its own."""
        self.bus.close()

    def join(self, member: Membership) -> None:
        """Read ``member``'s group too, from the next step on (its own pending entries first);
        from the thread that runs the loop."""
        self.reader.join(member)

    def leave(self, member: Membership) -> None:
        """Stop reading ``member``'s group; from the thread that runs the loop."""
        self.reader.leave(member)

    def write_with_next_read(
        self, commands: list[Command], check: Callable[[list[Any]], object]
    ) -> None:
        """Send ``commands`` ahead of the next read, in its round trip; ``check`` gets their
        replies first and raises to fail that step (whose read is then re-read as our own
        pending entries, like any failed step's). Sent alone instead before any pause, at the
        end of a ``drain`` and at a stop (``flush``). One write is held at a time."""
        self.reader.hold(commands, check)

    def flush(self) -> None:
        """Send the write held for the next read now, in a round trip of its own."""
        self.reader.flush()

    def interrupt(self) -> None:
        """From another thread, once the ``stop`` given to ``run`` is set: cut a blocking read
        short, so that the stop takes effect now rather than when the block runs out."""
        self.bus.unblock()

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, riding out what ``failed`` allows; then ``close``. The
        batch in hand is always finished (processed and acked) before a stop takes effect."""
        self._pause = stop.wait
        backoff_s = BACKOFF_MIN_S
        # The first read does not block: its step publishes the first heartbeat at once, so a
        # new member is live (readiness) when it starts, not a blocking read later.
        block_ms: int | None = None
        try:
            while not stop.is_set():
                self.stepped_at = time.time()
                try:
                    self.step(block_ms)
                    block_ms = self.block_ms
                except Exception as exc:
                    if not self.failed(exc, backoff_s):
                        return
                    self.reader.reset()
                    stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    continue
                backoff_s = BACKOFF_MIN_S
                self.retry_log.succeeded()
                if not self.streams:  # nothing to block on: wait as long as a read would
                    self._wait(self.block_ms / 1000)
            self._flush_at_stop()
        finally:
            self.close()

    def drain(self) -> int:
        """Step until nothing new, own-pending or claimable is left; returns entries handled.
        It never waits to gather a batch (the backlog is already there); errors propagate."""
        total = 0
        while True:
            n = self.step(block_ms=None)
            total += n
            if n == 0 and not self.reader.unfinished():
                self.flush()
                return total
            if n == 0 and self.aside:  # what is left waits for a node to answer again
                self.reader.pause_aside(None)

    def step(self, block_ms: int | None) -> int:
        """One read (``block_ms`` None: without blocking), then ``process``."""
        self.reader.follow(tuple(self.streams_to_read()), self.create_groups, self.makes_stream)
        batch = Batch([], [])
        if self.streams:
            if block_ms is not None:
                delay_s = self._read_after - time.monotonic()
                if delay_s > 0:
                    self._wait(delay_s)
            try:
                batch = self.reader.read(block_ms)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc) and self._left_out_gone():
                    return 0
                if not self.create_groups or "NOGROUP" not in str(exc):
                    raise
                log.warning("%s: a consumer group vanished (%s); recreating", self.group, exc)
                self.reader.reset()
                self.group_vanished()
                self.reader.follow(tuple(self.streams_to_read()), self.create_groups,
                                   self.makes_stream)  # fmt: skip
                return 0
            n = group_reads.largest_read(batch)
            if block_ms is not None and self.batch_wait_s and 0 < n < self.batch_size:
                # Entries arrived one by one: let the next ones gather before the next read.
                self._read_after = time.monotonic() + self.batch_wait_s
        return self.process(batch)

    def _left_out_gone(self) -> bool:
        """After a read met a group gone: leave out the streams read that no longer exist and
        that this loop may not make (an earlier partition count's, drained and deleted), so
        the others are read on; False when there are none (the group alone is gone) or none
        would be left."""
        streams = [s for s in self.streams if not self.makes_stream(s)]
        if not streams:
            return False
        found = self.bus.execute([command(b"EXISTS", s.encode()) for s in streams])
        gone = [s for s, n in zip(streams, found, strict=True) if n == 0]
        if not gone or len(gone) == len(self.streams):
            return False  # nothing left to read: the subclass decides (``failed``)
        self.reader.leave_out(gone)
        self.reader.follow(tuple(self.streams_to_read()), self.create_groups, self.makes_stream)
        log.info("%s: %s deleted (drained); reading on without", self.group, ", ".join(gone))
        return True

    def heartbeat_due(self) -> float | None:
        """The time to publish with (epoch s) when the heartbeat is due, else None; a subclass
        asks when it is about to write, so that the heartbeat rides along."""
        now = time.time()
        if now < self._next_heartbeat:
            return None
        self._next_heartbeat = now + self.heartbeat_s
        return now

    def _wait(self, wait_s: float) -> None:
        """A pause of the loop: a held write is not kept waiting through it."""
        self.flush()
        self._pause(wait_s)

    def _flush_at_stop(self) -> None:
        """The batch in hand is finished before a stop: its held write sent (if Redis is away,
        its entries stay pending, for a restart or a live consumer's claim)."""
        try:
            self.flush()
        except (redis.RedisError, OSError) as exc:
            log.warning("%s: the last batch's write failed at the stop (%s); its entries stay "
                        "pending", self.consumer, exc)  # fmt: skip


def stop_thread(loop: ConsumerLoop, thread: threading.Thread, deadline: float) -> None:
    """Once ``loop``'s stop is set: interrupt it until its ``thread`` ends or the monotonic
    ``deadline`` passes. Again at growing intervals, since a read sent just after an interrupt
    blocks its full time, and the batch in hand is finished first."""
    pause_s = 0.02
    while thread.is_alive() and time.monotonic() < deadline:
        loop.interrupt()
        thread.join(min(pause_s, max(deadline - time.monotonic(), 0.0)))
        pause_s = min(pause_s * 2, 0.5)
