"""One consumer loop over Redis stream consumer groups, for the model worker and the log bin.

Both read input streams through a consumer group and both must lose nothing: an entry stays
pending until its consumer acks it. So a consumer first re-reads its own pending entries (id
``0``) before new ones (``>``), after a start and after any failure (it may have crashed
mid-batch, or lost a read's reply, which moved entries to its pending list all the same), and
every ``claim_idle_ms / 2`` it takes over with XAUTOCLAIM the entries a dead consumer left
pending for longer than ``claim_idle_ms``. Around that: a backoff on Redis errors, the
heartbeat's timer, a wait after a short read so that the next batch gathers more, a drain (tests,
replays) and a stop. A loop may read several groups over its streams (``join``: a worker host's
shadow roles of a deployment), each with its own pending entries and claims, in the same round
trips.

A subclass supplies only what differs: which streams are read (``streams_to_read``), what a
batch is processed into, what is acked when and what the heartbeat carries (``process``: the
acks and the heartbeat ride in the subclass's own write round trip, once its work is safe), and
which failures it rides out (``failed``).

Round trips are the currency of this design, and the loop adds none. A step is one read round
trip through a ``BlockingRouter`` (raw replies on redis-py's connections, no command layer);
only after a start or a failure does a read of the consumer's own pending entries, and once per
claim interval an XAUTOCLAIM page per stream (all streams in one round trip), come before it.
The commands a subclass needs answered with every read (the worker's deployment revision) ride
in that same round trip (``read_along``). The subclass writes results, acks and heartbeat in
one more (through ``bus``), or hands them to ``write_with_next_read``: they then go ahead of the
next read in its round trip, so that at moderate load, where a read brings one or two entries,
a batch costs one round trip rather than two. Redis runs them before the read blocks, so they
take effect as soon as they would alone; only their replies come back with the read's.

On a Redis Cluster one command cannot span slots, so streams are read per slot: streams that
share a slot (one hash tag) in one XREADGROUP as before, blocking; streams spread over several
slots (the log bin's deployments, a partitioned deployment) each without blocking, all in one
round trip per node, with a short growing pause while every one of them is empty
(``IDLE_POLL_MAX_S``: the most an idle consumer adds to the first request after a lull). A
stream whose node stops answering is set aside while the others are read
(``rendezvous.bus.aside``).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from rendezvous.bus import group_reads
from rendezvous.bus.aside import UNREACHABLE, SetAside
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.connection import MEMORY_LIMIT, REDIS_DOWN, out_of_memory
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.group_reads import Batch, Entry, Membership, Read
from rendezvous.bus.routing import Command, command, raise_first_error, slot_of

log = logging.getLogger(__name__)


BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.25
"""The longest pause between tries while Redis is away. A consumer must be reading again well
within a request's timeout (1 s by default) of Redis's return: at 1 s, requests accepted just
after a restart timed out while the workers were still pausing. A try costs one failed connect."""
IDLE_POLL_MIN_S = 0.001
IDLE_POLL_MAX_S = 0.02

__all__ = ["Batch", "ConsumerLoop", "Entry", "Membership", "stop_thread"]


@dataclass
class _HeldWrite:
    """A subclass's write waiting for the next read's round trip."""

    commands: list[Command]
    check: Callable[[list[Any]], object]


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
    ):
        self.client = client
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_s = heartbeat_s
        self.create_groups = create_groups
        """Create the group on every stream read (and again when it vanished, as after a
        Redis restart without persistence); else a missing group is the subclass's failure."""
        self.batch_wait_s = 0.0
        """Wait after a short read before the next blocking one (``drain`` never waits)."""
        self.bus = BlockingRouter(client, timeout_s=timeout_s)
        """Every read goes through this; the subclass may write through it too."""
        self.streams: tuple[str, ...] = ()
        """The streams being read now (whose groups exist, when ``create_groups``)."""
        self.members: list[Membership] = [Membership(group, consumer)]
        """The groups read, each with its consumer and its own progress (``join``)."""
        self._idle = False
        """The last read of new entries found none in any group: only then does a read of
        several groups block (the first blocks, the others ride behind it); else a group
        behind the others would wait out the block of one that is not."""
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._read_after = 0.0
        """Monotonic time before which the next blocking read waits (gathering a batch)."""
        self._pause: Callable[[float], object] = time.sleep
        """How that wait is spent: ``stop.wait`` under ``run``, so a stop cuts it short."""
        self._count_b = b"%d" % batch_size
        self._along = list(read_along)
        self._idle_poll_s = 0.0
        self._aside = SetAside(consumer)
        """Streams left out of reads while their node does not answer."""
        self._held: _HeldWrite | None = None
        """The write handed to ``write_with_next_read``, not sent yet."""

    # -- what a subclass supplies -------------------------------------------------------------

    @abstractmethod
    def streams_to_read(self) -> Sequence[str]:
        """Called first in every step: the stream keys to read now."""

    @abstractmethod
    def process(self, batch: Batch) -> int:
        """Handle what a step read, possibly nothing (and publish the heartbeat when
        ``heartbeat_due`` says so); returns the entries handled. An entry stays pending, and is
        read again after a restart or a failure, until this acks it."""

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        """``run`` caught ``exc`` from a step: True to retry in ``retry_in_s`` (after
        re-reading our pending entries), False to stop; anything else, raise it. This default
        rides out Redis outages and Redis at its memory limit only."""
        if isinstance(exc, REDIS_DOWN):
            log.warning("%s: redis unavailable (%s); retrying in %.2fs", self.consumer, exc,
                        retry_in_s)  # fmt: skip
            return True
        if out_of_memory(exc):
            log.warning("%s: %s; retrying in %.2fs", self.consumer, MEMORY_LIMIT, retry_in_s)
            return True
        raise exc

    def close(self) -> None:
        """Called once when ``run`` ends; a subclass extends it to release its own."""
        self.bus.close()

    def join(self, member: Membership) -> None:
        """Read ``member``'s group too, from the next step on (its own pending entries first);
        from the thread that runs the loop."""
        self.members.append(member)
        member.pending_first.update(self.streams)
        self._idle = False

    def leave(self, member: Membership) -> None:
        """Stop reading ``member``'s group; from the thread that runs the loop."""
        self.members.remove(member)

    def write_with_next_read(
        self, commands: list[Command], check: Callable[[list[Any]], object]
    ) -> None:
        """Send ``commands`` ahead of the next read, in its round trip; ``check`` gets their
        replies first and raises to fail that step (whose read is then re-read as our own
        pending entries, like any failed step's). Sent alone instead before any pause, at the
        end of a ``drain`` and at a stop (``flush``). One write is held at a time."""
        assert self._held is None, "the held write was not sent"
        self._held = _HeldWrite(commands, check)

    def flush(self) -> None:
        """Send the write held for the next read now, in a round trip of its own."""
        held, self._held = self._held, None
        if held is not None:
            held.check(self.bus.execute(held.commands))

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
                try:
                    self.step(block_ms)
                    block_ms = self.block_ms
                except Exception as exc:
                    if not self.failed(exc, backoff_s):
                        return
                    self._reset()
                    stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    continue
                backoff_s = BACKOFF_MIN_S
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
            if n == 0 and not any(m.pending_first or m.claiming for m in self.members):
                self.flush()
                return total
            if n == 0 and self._aside:  # what is left waits for a node to answer again
                self._pause_aside(None)

    def step(self, block_ms: int | None) -> int:
        """One read (``block_ms`` None: without blocking), then ``process``."""
        self._follow_streams(tuple(self.streams_to_read()))
        batch = Batch([], [])
        if self.streams:
            if block_ms is not None:
                delay_s = self._read_after - time.monotonic()
                if delay_s > 0:
                    self._wait(delay_s)
            try:
                batch = self._read(block_ms)
            except redis.ResponseError as exc:
                if not self.create_groups or "NOGROUP" not in str(exc):
                    raise
                log.warning("%s: a consumer group vanished (%s); recreating", self.group, exc)
                streams = self.streams
                self._reset()
                self._follow_streams(streams)
                return 0
            n = group_reads.largest_read(batch)
            if block_ms is not None and self.batch_wait_s and 0 < n < self.batch_size:
                # Entries arrived one by one: let the next ones gather before the next read.
                self._read_after = time.monotonic() + self.batch_wait_s
        return self.process(batch)

    def heartbeat_due(self) -> float | None:
        """The time to publish with (epoch s) when the heartbeat is due, else None; a subclass
        asks when it is about to write, so that the heartbeat rides along."""
        now = time.time()
        if now < self._next_heartbeat:
            return None
        self._next_heartbeat = now + self.heartbeat_s
        return now

    def _reset(self) -> None:
        """After a failure: our own pending entries are re-read first (a failed write or a lost
        reply left them unprocessed or unacked), groups are recreated if ours to create, and
        a claim scan starts over."""
        self.streams = ()
        self._idle = False
        self._held = None  # its entries are still pending: re-read, processed and written again
        for member in self.members:
            member.reset()

    def _follow_streams(self, streams: tuple[str, ...]) -> None:
        if streams == self.streams:
            return
        new = [s for s in streams if s not in self.streams]
        if new and self.create_groups:
            self._create_groups(new)
        for member in self.members:
            for gone in set(self.streams).difference(streams):
                member.pending_first.discard(gone)
                member.claiming.pop(gone, None)
            member.pending_first.update(new)
        self.streams = streams

    def _create_groups(self, streams: list[str]) -> None:
        pairs = [(m, s) for m in self.members for s in streams]
        commands = [command(b"XGROUP", b"CREATE", s.encode(), m.group_b, b"0", b"MKSTREAM",
                            key_at=2)
                    for m, s in pairs]  # fmt: skip
        reads = [Read(m, [s]) for m, s in pairs]
        replies = self._tolerate_lost(self.bus.execute(commands), reads, among=streams)
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    # -- streams whose node is lost -----------------------------------------------------------

    def _pause_aside(self, block_ms: int | None) -> None:
        """Until the first stream set aside is tried again (at most a blocking read's time)."""
        wait_s = self._aside.wait_s(block_ms)
        if wait_s > 0:
            self._wait(wait_s)

    def _tolerate_lost(
        self, replies: list[Any], reads: Sequence[Read], among: Iterable[str] = ()
    ) -> list[Any]:
        """Replies of commands (each ``reads[i]``) whose node is lost read as empty while
        other streams of this consumer (``self.streams`` and ``among``) may answer; the lost
        streams' own pending entries are re-read, in every group, once they are back."""
        streams = [read.streams for read in reads]
        out, aside = self._aside.tolerate(replies, streams, {*self.streams, *among})
        for member in self.members:
            member.pending_first.update(aside)
        return out

    # -- reading ------------------------------------------------------------------------------

    def _read(self, block_ms: int | None) -> Batch:
        reachable = self._aside.reachable(self.streams)
        if not reachable:  # every stream set aside: wait for the first to be tried again
            self._pause_aside(block_ms)
            return Batch([], [])
        commands: list[Command] = []
        reads: list[Read] = []
        for member in self.members:
            pending = [s for s in reachable if s in member.pending_first]
            if pending:
                more, more_reads = self._xreadgroup(member, self._by_slot(pending), b"0", None)
                commands += more
                reads += more_reads
        if commands:
            replies, along = self._round_trip(commands, reads=reads)
            batch = group_reads.batch_of(reads, replies, along)
            found = {(id(member), s) for member, (s, _, _) in zip(batch.members, batch.entries,
                                                                  strict=True)}  # fmt: skip
            for read in reads:
                read.member.pending_first.difference_update(
                    s
                    for s in read.streams
                    if (id(read.member), s) not in found and s not in self._aside
                )
            if batch.entries:
                return batch
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(self.claim_idle_ms / 1000 / 2, 0.5)
            for member in self.members:
                member.claiming = dict.fromkeys(self.streams, b"0-0")
        if any(member.claiming for member in self.members):
            batch = self._claim()
            if batch.entries:
                log.info("%s: reclaimed %d entries from dead consumers", self.group,
                         len(batch.entries))  # fmt: skip
                return batch
        reachable = self._aside.reachable(self.streams)
        if not reachable:
            return Batch([], [])
        # While a stream is set aside, the others are polled, not blocked on: the one coming
        # back is then read at once. Several groups over one slot: the first read blocks and
        # the others, in the same round trip behind it, find what woke it (a group behind
        # the others is read without blocking until every read comes back empty).
        aside = len(reachable) < len(self.streams)
        by_slot = self._by_slot(reachable)
        one_node = len(by_slot) == 1 and not aside
        blocking = one_node and (len(self.members) == 1 or self._idle)
        commands = []
        reads = []
        for member in self.members:
            wait_ms = block_ms if blocking and not commands else None
            more, more_reads = self._xreadgroup(member, by_slot, b">", wait_ms)
            commands += more
            reads += more_reads
        polling = block_ms is not None and not one_node
        timeout_s = self.bus.timeout_s
        if timeout_s is not None and block_ms is not None and blocking:
            timeout_s += block_ms / 1000
        # A read whose reply was lost has moved entries to our pending list, which the failure
        # path (or, for a stream set aside, the return of its node) re-reads first.
        replies, along = self._round_trip(commands, timeout_s, reads)
        batch = group_reads.batch_of(reads, replies, along)
        self._idle = not batch.entries
        if polling:
            assert block_ms is not None
            if batch.entries:
                self._idle_poll_s = 0.0
            else:  # every slot empty: wait a little, then poll again
                self._idle_poll_s = min(max(self._idle_poll_s * 2, IDLE_POLL_MIN_S),
                                        IDLE_POLL_MAX_S, block_ms / 1000)  # fmt: skip
                self._wait(self._idle_poll_s)
        return batch

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

    def _claim(self) -> Batch:
        """One XAUTOCLAIM page per group and stream still being scanned, all in one round
        trip."""
        idle = b"%d" % self.claim_idle_ms
        reads = [Read(member, [stream]) for member in self.members
                 for stream in self._aside.reachable(member.claiming)]  # fmt: skip
        if not reads:
            return Batch([], [])
        commands = [group_reads.xautoclaim(read.member, read.streams[0], idle, self._count_b)
                    for read in reads]  # fmt: skip
        replies, along = self._round_trip(commands, reads=reads)
        batch = Batch([], along)
        for read, reply in zip(reads, replies, strict=True):
            if reply is not None:  # else set aside: its scan goes on when it is back
                found = group_reads.claimed(read, reply)
                batch.entries += found
                batch.members += [read.member] * len(found)
        batch.claimed = len(batch.entries)
        return batch

    def _by_slot(self, streams: Iterable[str]) -> list[list[str]]:
        """``streams`` by the slot they live in (one command cannot span slots)."""
        by_slot: dict[int, list[str]] = {}
        for stream in streams:
            by_slot.setdefault(slot_of(self.client, stream.encode()), []).append(stream)
        return list(by_slot.values())

    def _xreadgroup(
        self, member: Membership, by_slot: list[list[str]], entry_id: bytes, block_ms: int | None
    ) -> tuple[list[Command], list[Read]]:
        """``member``'s XREADGROUPs, one per slot (only the first may block), and what each
        reads."""
        return group_reads.xreadgroup(member, by_slot, entry_id, self._count_b, block_ms)

    def _round_trip(
        self,
        commands: list[Command],
        timeout_s: float | None = None,
        reads: Sequence[Read] | None = None,
    ) -> tuple[list[Any], list[Any]]:
        """``commands``' replies and ``read_along``'s, sent together. ``reads``: what each
        command reads, so that the streams of a lost node are set aside (their replies
        ``None``) while the others are read."""
        held, self._held = self._held, None
        ahead = held.commands if held is not None else []
        replies = self.bus.execute(ahead + commands + self._along, timeout_s=timeout_s)
        if held is not None:
            held.check(replies[: len(ahead)])
            replies = replies[len(ahead) :]
        out, along = replies[: len(commands)], replies[len(commands) :]
        if reads is not None:
            out = raise_first_error(self._tolerate_lost(out, reads))
            # Streams on other nodes answered: what rides along (the worker's revision, on the
            # deployment's own node, partition 0's) reads as None while its node is away.
            along = [None if isinstance(r, UNREACHABLE) else r for r in along]
        return raise_first_error(out), raise_first_error(along)


def stop_thread(loop: ConsumerLoop, thread: threading.Thread, deadline: float) -> None:
    """Once ``loop``'s stop is set: interrupt it until its ``thread`` ends or the monotonic
    ``deadline`` passes. Again at growing intervals, since a read sent just after an interrupt
    blocks its full time, and the batch in hand is finished first."""
    pause_s = 0.02
    while thread.is_alive() and time.monotonic() < deadline:
        loop.interrupt()
        thread.join(min(pause_s, max(deadline - time.monotonic(), 0.0)))
        pause_s = min(pause_s * 2, 0.5)
