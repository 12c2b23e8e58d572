"""The commands a consumer loop reads with, and their replies as entries.

A consumer loop (``rendezvous.bus.consumer``) reads its streams as a member of one consumer
group or of several (a worker host's shadow roles of one deployment: one group each, over the
same input stream, read in one round trip). A ``Membership`` is one (group, consumer) pair with
its own progress: which streams still have their own pending entries to re-read, and where its
XAUTOCLAIM scans stand. Pure command building and reply parsing, no I/O.
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
