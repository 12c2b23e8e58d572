"""The commands a consumer loop reads with, and their replies as entries.

A consumer loop (``rendezvous.bus.consumer``, through ``rendezvous.bus.reader``) reads its
streams as a member of one consumer group or of several (a worker host's shadow roles of one
deployment: one group each, over the same input stream, read in one round trip). A
``Membership`` is one (group, consumer) pair with its own progress: which streams still have
their own pending entries to re-read, and where its XAUTOCLAIM scans stand. Pure command
building and reply parsing, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rendezvous.bus.routing import Command

Entry = tuple[str, bytes, dict[bytes, bytes]]
"""(stream key, entry id, fields) of one stream entry. No fields: the entry was deleted from
the stream (trimmed) while it was pending."""


@dataclass(eq=False)
class Membership:
    """One consumer in one group, over every stream its loop reads."""

    group: str
    consumer: str
    pending_first: set[str] = field(default_factory=set)
    """Streams whose own pending entries have still to be re-read (id 0)."""
    claiming: dict[str, bytes] = field(default_factory=dict)
    """Streams in an XAUTOCLAIM scan -> the scan's cursor."""

    def __post_init__(self) -> None:
        self.group_b = self.group.encode()
        self.consumer_b = self.consumer.encode()

    def reset(self) -> None:
        self.pending_first.clear()
        self.claiming.clear()


@dataclass(slots=True)
class Read:
    """One command of a read round trip: whose, and over which streams."""

    member: Membership
    streams: list[str]


@dataclass(slots=True)
class Batch:
    """What one step read."""

    entries: list[Entry]
    along: list[Any]
    """The replies to ``read_along``, answered in the read's round trip (empty: no read)."""
    claimed: int = 0
    """How many of ``entries`` were taken over from other consumers by XAUTOCLAIM."""
    members: list[Membership] = field(default_factory=list)
    """For each of ``entries``, the membership (group) it was read for, which acks it."""


def xreadgroup(
    member: Membership, by_slot: Iterable[list[str]], entry_id: bytes, count: bytes,
    block_ms: int | None,
) -> tuple[list[Command], list[Read]]:  # fmt: skip
    """One XREADGROUP per slot's streams (``block_ms``: the first command blocks)."""
    commands: list[Command] = []
    reads: list[Read] = []
    for streams in by_slot:
        args = [b"XREADGROUP", b"GROUP", member.group_b, member.consumer_b, b"COUNT", count]
        if block_ms is not None and not commands:
            args += [b"BLOCK", b"%d" % block_ms]
        keys = [stream.encode() for stream in streams]
        commands.append(Command(keys[0], (*args, b"STREAMS", *keys, *[entry_id] * len(keys))))
        reads.append(Read(member, streams))
    return commands, reads


def xautoclaim(member: Membership, stream: str, idle: bytes, count: bytes) -> Command:
    return Command(stream.encode(), (b"XAUTOCLAIM", stream.encode(), member.group_b,
                                     member.consumer_b, idle, member.claiming[stream],
                                     b"COUNT", count))  # fmt: skip


def claimed(read: Read, reply: Any) -> list[Entry]:
    """The entries of an XAUTOCLAIM page over ``read``'s one stream, its scan moved on."""
    member, (stream,) = read.member, read.streams
    if reply[0] == b"0-0":
        del member.claiming[stream]
    else:
        member.claiming[stream] = reply[0]
    found: list[Entry] = []
    for item in reply[1]:
        if item is None:
            # Redis 6.2: an entry deleted while pending, claimed but without its id; our
            # pending read returns it (as deleted) to be acked.
            member.pending_first.add(stream)
        else:
            found.append((stream, item[0], fields(item[1])))
    # Redis 7: the ids of entries deleted while pending, dropped from the group.
    return found + [(stream, entry_id, {}) for entry_id in (reply[2] if len(reply) > 2 else ())]


def entries(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply over any streams (none when a block ran out): RESP3
    (``{stream: entries}``, redis-py's default protocol since 8) or RESP2 (pairs)."""
    out: list[Entry] = []
    pairs = reply.items() if isinstance(reply, dict) else reply or ()
    for stream, found in pairs:
        key = stream.decode()
        out += [(key, entry_id, fields(flat)) for entry_id, flat in found]
    return out


def fields(flat: Sequence[bytes] | None) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}


def batch_of(reads: Sequence[Read], replies: list[Any], along: list[Any]) -> Batch:
    """The entries of a round trip's XREADGROUP replies, each with the membership it was
    read for."""
    batch = Batch([], along)
    for read, reply in zip(reads, replies, strict=True):
        found = entries(reply)
        batch.entries += found
        batch.members += [read.member] * len(found)
    return batch


def largest_read(batch: Batch) -> int:
    """The most entries any one group's read brought (the batch size counts per read)."""
    if len(batch.members) < 2 or batch.members[0] is batch.members[-1]:
        return len(batch.entries)
    counts: dict[int, int] = {}
    for member in batch.members:
        counts[id(member)] = counts.get(id(member), 0) + 1
    return max(counts.values())
