"""What one step of a consumer loop reads, in as few round trips as it can.

After a start or a failure a consumer first re-reads its own pending entries (id ``0``) before
new ones (``>``): it may have crashed mid-batch, or lost a read's reply, which moved entries to
its pending list all the same. Every ``claim_idle_ms / 2`` it takes over with XAUTOCLAIM the
entries a dead consumer left pending for longer than ``claim_idle_ms``, a page per stream, all
streams in one round trip. Then it reads new entries, blocking. Several groups (``join``: a
worker host's shadow roles of a deployment) are read in the same round trips, each with its own
pending entries and claims: the first XREADGROUP blocks and the others ride behind it, once a
read found nothing in any group (a group behind the others must not wait out another's block).

Ahead of a read rides the write its consumer held for it (``hold``: the last batch's results,
acks and heartbeat; Redis runs them before the read blocks; on a cluster, a read that blocks
gets none, since a redirected write is only sent again once the block ends), behind it the
commands whose answers the consumer needs with every read (``read_along``: the worker's
deployment revision).

On a Redis Cluster one command cannot span slots, so streams are read per slot: streams that
share a slot (one hash tag) in one XREADGROUP, blocking; streams spread over several slots (the
log bin's deployments, a partitioned deployment) each without blocking, all in one round trip
per node, with a short growing pause while every one of them is empty (``IDLE_POLL_MAX_S``: the
most an idle consumer adds to the first request after a lull). A stream whose node stops
answering is set aside while the others are read (``rendezvous.bus.aside``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from rendezvous.bus import group_reads
from rendezvous.bus.aside import UNREACHABLE, SetAside
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.connection import Client as AnyClient
from rendezvous.bus.group_reads import Batch, Membership, Read
from rendezvous.bus.routing import Command, command, raise_first_error, slot_of

log = logging.getLogger(__name__)

MISSING_RETRY_S = 1.0
"""How often a stream found gone, that this reader may not make, is looked for again."""
IDLE_POLL_MIN_S = 0.001
IDLE_POLL_MAX_S = 0.02


@dataclass
class _HeldWrite:
    """A consumer's write waiting for the next read's round trip."""

    commands: list[Command]
    check: Callable[[list[Any]], object]


class GroupReader:
    """The reads of one consumer loop: its groups, the streams it reads and how far each group
    is with them; not thread-safe, like the loop that owns it."""

    def __init__(
        self,
        client: AnyClient,
        member: Membership,
        *,
        batch_size: int,
        claim_idle_ms: int,
        read_along: Sequence[Command],
        timeout_s: float | None,
        wait: Callable[[float], None],
    ):
        self.client = client
        self.bus = BlockingRouter(client, timeout_s=timeout_s)
        """Every read goes through this; the consumer may write through it too."""
        self.members: list[Membership] = [member]
        """The groups read, each with its consumer and its own progress (``join``)."""
        self.streams: tuple[str, ...] = ()
        """The streams being read now (whose groups exist, when the loop creates them)."""
        self.missing: dict[str, float] = {}
        """Streams asked for but gone, that this reader may not make (see ``follow``), each
        with the monotonic time it is looked for again (another may make it meanwhile)."""
        self.aside = SetAside(member.consumer)
        """Streams left out of reads while their node does not answer."""
        self.claim_idle_ms = claim_idle_ms
        self._count_b = b"%d" % batch_size
        self._along = list(read_along)
        self._wait = wait
        """The loop's pause (a stop cuts it short; a held write is sent first)."""
        self._idle = False
        """The last read of new entries found none in any group: only then does a read of
        several groups block."""
        self._next_claim = 0.0
        self._idle_poll_s = 0.0
        self._held: _HeldWrite | None = None

    # -- what is read -------------------------------------------------------------------------

    def join(self, member: Membership) -> None:
        self.members.append(member)
        member.pending_first.update(self.streams)
        self._idle = False

    def leave(self, member: Membership) -> None:
        self.members.remove(member)

    def unfinished(self) -> bool:
        """Own pending entries or a claim scan left to read."""
        return any(m.pending_first or m.claiming for m in self.members)

    def reset(self) -> None:
        """After a failure: every group re-reads its own pending entries first and starts a new
        claim scan; the streams are followed (and their groups created) again; a held write is
        dropped (its entries are still pending: read, processed and written again)."""
        self.streams = ()
        self._idle = False
        self._held = None
        for member in self.members:
            member.reset()

    def follow(
        self,
        streams: tuple[str, ...],
        create_groups: bool,
        makes_stream: Callable[[str], bool] = lambda stream: True,
    ) -> None:
        """Read ``streams`` from now on (a new one's own pending entries first). Where groups
        are created, a stream ``makes_stream`` refuses is never made: if it does not exist (a
        deleted deployment's, purged), it is left out until it is made elsewhere."""
        if self.missing:
            now = time.monotonic()
            self.missing = {s: at for s, at in self.missing.items()
                            if at > now and s in streams and not makes_stream(s)}  # fmt: skip
            streams = tuple(s for s in streams if s not in self.missing)
        if streams == self.streams:
            return
        new = [s for s in streams if s not in self.streams]
        if new and create_groups:
            self._create_groups(new, makes_stream)
            streams = tuple(s for s in streams if s not in self.missing)
            new = [s for s in new if s not in self.missing]
        for member in self.members:
            for gone in set(self.streams).difference(streams):
                member.pending_first.discard(gone)
                member.claiming.pop(gone, None)
            member.pending_first.update(new)
        self.streams = streams

    def leave_out(self, streams: list[str]) -> None:
        """``streams`` are gone (and may not be made here): read without them, looking for
        them again every ``MISSING_RETRY_S`` while they are asked for."""
        for stream in streams:
            self.missing[stream] = time.monotonic() + MISSING_RETRY_S

    def _create_groups(self, streams: list[str], makes_stream: Callable[[str], bool]) -> None:
        pairs = [(m, s) for m in self.members for s in streams]
        commands = [command(b"XGROUP", b"CREATE", s.encode(), m.group_b, b"0",
                            *((b"MKSTREAM",) if makes_stream(s) else ()), key_at=2)
                    for m, s in pairs]  # fmt: skip
        reads = [Read(m, [s]) for m, s in pairs]
        replies = self._tolerate_lost(self.bus.execute(commands), reads, among=streams)
        for (_, stream), reply in zip(pairs, replies, strict=True):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                if "requires the key to exist" not in str(reply):
                    raise reply
                self.leave_out([stream])

    # -- the write ahead of the next read -----------------------------------------------------

    def hold(self, commands: list[Command], check: Callable[[list[Any]], object]) -> None:
        assert self._held is None, "the held write was not sent"
        self._held = _HeldWrite(commands, check)

    def flush(self) -> None:
        """Send the held write now, in a round trip of its own."""
        held, self._held = self._held, None
        if held is not None:
            held.check(self.bus.execute(held.commands))

    # -- streams whose node is lost -----------------------------------------------------------

    def pause_aside(self, block_ms: int | None) -> None:
        """Until the first stream set aside is tried again (at most a blocking read's time)."""
        wait_s = self.aside.wait_s(block_ms)
        if wait_s > 0:
            self._wait(wait_s)

    def _tolerate_lost(
        self, replies: list[Any], reads: Sequence[Read], among: Iterable[str] = ()
    ) -> list[Any]:
        """Replies of commands (each ``reads[i]``) whose node is lost read as empty while
        other streams of this consumer (``self.streams`` and ``among``) may answer; the lost
        streams' own pending entries are re-read, in every group, once they are back."""
        streams = [read.streams for read in reads]
        out, aside = self.aside.tolerate(replies, streams, {*self.streams, *among})
        for member in self.members:
            member.pending_first.update(aside)
        return out

    # -- reading ------------------------------------------------------------------------------

    def read(self, block_ms: int | None) -> Batch:
        """One step's read (``block_ms`` None: without blocking): own pending entries first,
        then a claim scan's page when one is due, then new entries."""
        reachable = self.aside.reachable(self.streams)
        if not reachable:  # every stream set aside: wait for the first to be tried again
            self.pause_aside(block_ms)
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
                    if (id(read.member), s) not in found and s not in self.aside
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
                log.info("%s: reclaimed %d entries from dead consumers", self.members[0].group,
                         len(batch.entries))  # fmt: skip
                return batch
        reachable = self.aside.reachable(self.streams)
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
        blocks = blocking and block_ms is not None
        timeout_s = self.bus.timeout_s
        if timeout_s is not None and blocks:
            assert block_ms is not None
            timeout_s += block_ms / 1000
        # A read whose reply was lost has moved entries to our pending list, which the failure
        # path (or, for a stream set aside, the return of its node) re-reads first.
        replies, along = self._round_trip(commands, timeout_s, reads, blocks=blocks)
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

    def _claim(self) -> Batch:
        """One XAUTOCLAIM page per group and stream still being scanned, all in one round
        trip."""
        idle = b"%d" % self.claim_idle_ms
        reads = [Read(member, [stream]) for member in self.members
                 for stream in self.aside.reachable(member.claiming)]  # fmt: skip
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
        blocks: bool = False,
    ) -> tuple[list[Any], list[Any]]:
        """``commands``' replies and ``read_along``'s, sent together behind the held write
        (whose check comes first). ``reads``: what each command reads, so that the streams of a
        lost node are set aside (their replies ``None``) while the others are read."""
        if blocks and isinstance(self.client, redis.RedisCluster):
            # A held write redirected (MOVED, ASK: a slot moving, a failover) is sent again
            # only once every reply is in, which a blocking read would delay by its block.
            self.flush()
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
