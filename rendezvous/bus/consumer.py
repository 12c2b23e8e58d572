"""One consumer loop over Redis stream consumer groups, for the model worker and the log bin.

Both read input streams through a consumer group and both must lose nothing: an entry stays
pending until its consumer acks it. So a consumer first re-reads its own pending entries (id
``0``) before new ones (``>``), after a start and after any failure (it may have crashed
mid-batch, or lost a read's reply, which moved entries to its pending list all the same), and
every ``claim_idle_ms / 2`` it takes over with XAUTOCLAIM the entries a dead consumer left
pending for longer than ``claim_idle_ms``. Around that: a backoff on Redis errors, the
heartbeat's timer, a wait after a short read so that the next batch gathers more, a drain (tests,
replays) and a stop. The worker and the log bin each had a copy, and the copies had drifted
(only one followed the XAUTOCLAIM cursor); ``ConsumerLoop`` is now the one copy.

A subclass supplies only what differs: which streams are read (``streams_to_read``), what a
batch is processed into, what is acked when and what the heartbeat carries (``process``: the
acks and the heartbeat ride in the subclass's own write round trip, once its work is safe), and
which failures it rides out (``failed``).

Round trips are the currency of this design, and the loop adds none. A step is one read round
trip through a ``BlockingRouter`` (raw replies on redis-py's connections, no command layer);
only after a start or a failure does a read of the consumer's own pending entries, and once per
claim interval an XAUTOCLAIM page per stream (all streams in one round trip), come before it.
The commands a subclass needs answered with every read (the worker's deployment revision) ride
in that same round trip (``read_along``), and the subclass writes results, acks and heartbeat
in one more (through ``bus`` or on its redis-py client).

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

from rendezvous.bus.aside import UNREACHABLE, SetAside
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.connection import MEMORY_LIMIT, REDIS_DOWN, out_of_memory
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.routing import Command, command, raise_first_error, slot_of

log = logging.getLogger(__name__)


BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.25
"""The longest pause between tries while Redis is away. A consumer must be reading again well
within a request's timeout (1 s by default) of Redis's return: at 1 s, requests accepted just
after a restart timed out while the workers were still pausing. A try costs one failed connect."""
IDLE_POLL_MIN_S = 0.001
IDLE_POLL_MAX_S = 0.02
Entry = tuple[str, bytes, dict[bytes, bytes]]
"""(stream key, entry id, fields) of one stream entry. No fields: the entry was deleted from
the stream (trimmed) while it was pending."""


@dataclass(slots=True)
class Batch:
    """What one step read."""

    entries: list[Entry]
    along: list[Any]
    """The replies to ``read_along``, answered in the read's round trip (empty: no read)."""
    claimed: int = 0
    """How many of ``entries`` were taken over from other consumers by XAUTOCLAIM."""


class ConsumerLoop(ABC):
    """Reads batches from ``group`` as ``consumer``; a subclass processes and acks them."""

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
        self._pending_first: set[str] = set()
        """Streams whose own pending entries have still to be re-read (id 0)."""
        self._claiming: dict[str, bytes] = {}
        """Streams in an XAUTOCLAIM scan -> the scan's cursor."""
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._read_after = 0.0
        """Monotonic time before which the next blocking read waits (gathering a batch)."""
        self._pause: Callable[[float], object] = time.sleep
        """How that wait is spent: ``stop.wait`` under ``run``, so a stop cuts it short."""
        self._group_b = group.encode()
        self._consumer_b = consumer.encode()
        self._count_b = b"%d" % batch_size
        self._along = list(read_along)
        self._idle_poll_s = 0.0
        self._aside = SetAside(consumer)
        """Streams left out of reads while their node does not answer."""

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
                    stop.wait(self.block_ms / 1000)
        finally:
            self.close()

    def drain(self) -> int:
        """Step until nothing new, own-pending or claimable is left; returns entries handled.
        It never waits to gather a batch (the backlog is already there); errors propagate."""
        total = 0
        while True:
            n = self.step(block_ms=None)
            total += n
            if n == 0 and not self._pending_first and not self._claiming:
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
                    self._pause(delay_s)
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
            n = len(batch.entries)
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
        self._pending_first.clear()
        self._claiming.clear()

    def _follow_streams(self, streams: tuple[str, ...]) -> None:
        if streams == self.streams:
            return
        new = [s for s in streams if s not in self.streams]
        if new and self.create_groups:
            self._create_groups(new)
        for gone in set(self.streams).difference(streams):
            self._pending_first.discard(gone)
            self._claiming.pop(gone, None)
        self._pending_first.update(new)
        self.streams = streams

    def _create_groups(self, streams: list[str]) -> None:
        commands = [command(b"XGROUP", b"CREATE", s.encode(), self._group_b, b"0", b"MKSTREAM",
                            key_at=2)
                    for s in streams]  # fmt: skip
        replies = self._tolerate_lost(self.bus.execute(commands), [[s] for s in streams],
                                      among=streams)  # fmt: skip
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    # -- streams whose node is lost -----------------------------------------------------------

    def _pause_aside(self, block_ms: int | None) -> None:
        """Until the first stream set aside is tried again (at most a blocking read's time)."""
        wait_s = self._aside.wait_s(block_ms)
        if wait_s > 0:
            self._pause(wait_s)

    def _tolerate_lost(
        self, replies: list[Any], streams: Sequence[Sequence[str]], among: Iterable[str] = ()
    ) -> list[Any]:
        """Replies of commands (each over ``streams[i]``) whose node is lost read as empty
        while other streams of this consumer (``self.streams`` and ``among``) may answer; the
        lost streams' own pending entries are re-read once they are back."""
        out, aside = self._aside.tolerate(replies, streams, {*self.streams, *among})
        self._pending_first.update(aside)
        return out

    # -- reading ------------------------------------------------------------------------------

    def _read(self, block_ms: int | None) -> Batch:
        reachable = self._aside.reachable(self.streams)
        if not reachable:  # every stream set aside: wait for the first to be tried again
            self._pause_aside(block_ms)
            return Batch([], [])
        pending = [s for s in reachable if s in self._pending_first]
        if pending:
            reads, streams = self._xreadgroup(pending, b"0", None)
            replies, along = self._round_trip(reads, streams=streams)
            entries = [entry for reply in replies for entry in _entries(reply)]
            found = {stream for stream, _, _ in entries}
            self._pending_first.difference_update(
                s for s in pending if s not in found and s not in self._aside
            )
            if entries:
                return Batch(entries, along)
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(self.claim_idle_ms / 1000 / 2, 0.5)
            self._claiming = dict.fromkeys(self.streams, b"0-0")
        if self._claiming:
            entries, along = self._claim()
            if entries:
                log.info("%s: reclaimed %d entries from dead consumers", self.group, len(entries))
                return Batch(entries, along, claimed=len(entries))
        reachable = self._aside.reachable(self.streams)
        if not reachable:
            return Batch([], [])
        # While a stream is set aside, the others are polled, not blocked on: the one coming
        # back is then read at once.
        aside = len(reachable) < len(self.streams)
        reads, streams = self._xreadgroup(reachable, b">", None if aside else block_ms)
        polling = block_ms is not None and (len(reads) > 1 or aside)
        timeout_s = self.bus.timeout_s
        if timeout_s is not None and block_ms is not None and not polling:
            timeout_s += block_ms / 1000
        # A read whose reply was lost has moved entries to our pending list, which the failure
        # path (or, for a stream set aside, the return of its node) re-reads first.
        replies, along = self._round_trip(reads, timeout_s, streams)
        entries = [entry for reply in replies for entry in _entries(reply)]
        if polling:
            assert block_ms is not None
            if entries:
                self._idle_poll_s = 0.0
            else:  # every slot empty: wait a little, then poll again
                self._idle_poll_s = min(max(self._idle_poll_s * 2, IDLE_POLL_MIN_S),
                                        IDLE_POLL_MAX_S, block_ms / 1000)  # fmt: skip
                self._pause(self._idle_poll_s)
        return Batch(entries, along)

    def _claim(self) -> tuple[list[Entry], list[Any]]:
        """One XAUTOCLAIM page per stream still being scanned, all in one round trip."""
        idle = b"%d" % self.claim_idle_ms
        streams = self._aside.reachable(self._claiming)
        if not streams:
            return [], []
        commands = [command(b"XAUTOCLAIM", s.encode(), self._group_b, self._consumer_b, idle,
                            self._claiming[s], b"COUNT", self._count_b)
                    for s in streams]  # fmt: skip
        replies, along = self._round_trip(commands, streams=[[s] for s in streams])
        entries: list[Entry] = []
        for stream, reply in zip(streams, replies, strict=True):
            if reply is None:  # set aside: its scan goes on when it is back
                continue
            if reply[0] == b"0-0":
                del self._claiming[stream]
            else:
                self._claiming[stream] = reply[0]
            for item in reply[1]:
                if item is None:
                    # Redis 6.2: an entry deleted while pending, claimed but without its id;
                    # our pending read returns it (as deleted) to be acked.
                    self._pending_first.add(stream)
                else:
                    entries.append((stream, item[0], _fields(item[1])))
            # Redis 7: the ids of entries deleted while pending, dropped from the group.
            entries += [(stream, entry_id, {}) for entry_id in (reply[2] if len(reply) > 2 else ())]
        return entries, along

    def _xreadgroup(
        self, streams: Iterable[str], entry_id: bytes, block_ms: int | None
    ) -> tuple[list[Command], list[list[str]]]:
        """One XREADGROUP per slot the streams live in (it blocks only if there is one), and
        the streams each reads."""
        by_slot: dict[int, list[str]] = {}
        for stream in streams:
            by_slot.setdefault(slot_of(self.client, stream.encode()), []).append(stream)
        args = [b"XREADGROUP", b"GROUP", self._group_b, self._consumer_b, b"COUNT", self._count_b]
        if block_ms is not None and len(by_slot) == 1:
            args += [b"BLOCK", b"%d" % block_ms]
        groups = list(by_slot.values())
        commands = []
        for group in groups:
            keys = [stream.encode() for stream in group]
            commands.append(Command(keys[0], (*args, b"STREAMS", *keys, *[entry_id] * len(keys))))
        return commands, groups

    def _round_trip(
        self,
        commands: list[Command],
        timeout_s: float | None = None,
        streams: Sequence[Sequence[str]] | None = None,
    ) -> tuple[list[Any], list[Any]]:
        """``commands``' replies and ``read_along``'s, sent together. ``streams``: what each
        command reads, so that the streams of a lost node are set aside (their replies
        ``None``) while the others are read."""
        replies = self.bus.execute(commands + self._along, timeout_s=timeout_s)
        out, along = replies[: len(commands)], replies[len(commands) :]
        if streams is not None:
            out = raise_first_error(self._tolerate_lost(out, streams))
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


def _entries(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply over any streams (none when a block ran out): RESP3
    (``{stream: entries}``, redis-py's default protocol since 8) or RESP2 (pairs)."""
    out: list[Entry] = []
    pairs = reply.items() if isinstance(reply, dict) else reply or ()
    for stream, found in pairs:
        key = stream.decode()
        out += [(key, entry_id, _fields(flat)) for entry_id, flat in found]
    return out


def _fields(flat: list[bytes] | None) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
