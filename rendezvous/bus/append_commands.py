"""The Redis commands of one append, as ``StreamAppender`` queues and sends them.

An append with a unique key (a request id) is one Lua script: take the key and XADD, or do
neither, atomically on the node that holds both (they share a hash tag). During a slot
migration the key and its stream can sit on two nodes, so the appender then sends the take and
the plain XADD as two commands (``take``, ``plain_xadd``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from rendezvous.bus.routing import Command

_TAKE_KEY = b"""
local held = redis.call('GET', KEYS[1])
if held and (ARGV[2] == '' or held ~= ARGV[2]) then return false end
redis.call('SET', KEYS[1], ARGV[2] == '' and '1' or ARGV[2], 'PX', ARGV[1])
"""
"""Take the unique key (ARGV: ttl ms, owner) unless it is held: by anyone when there is no
owner, else by another owner (an owner's own later tries find the key theirs)."""

_XADD_IF_NEW = _TAKE_KEY + b"return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))\n"
"""Take the unique key and append, or do neither: one command, atomic, on the node that holds
both keys (they share a hash tag)."""

_TAKE = _TAKE_KEY + b"return 'OK'\n"
"""The key alone (a migrating slot splits the key and its stream between nodes)."""

_XADD_IF_NEW_TO_EXISTING = (
    b"""
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('NOSTREAM ' .. KEYS[2] .. ' does not exist')
end
"""
    + _XADD_IF_NEW
)
"""The same, to a stream that must exist (the key is not taken when it does not)."""


@dataclass(slots=True)
class PendingAppend:
    """One append, queued for the next round trip or waiting to be tried again."""

    stream: bytes
    fields: dict[bytes, bytes]
    maxlen: int | None
    on_error: Callable[[Exception], None] | None
    unique: tuple[bytes, int, bytes] | None = None
    """(key, ttl ms, owner): append only if the key was free (or the owner's), and take it."""
    replicated: asyncio.Future[None] | None = None
    """Resolved once the append reached ``wait_replicas`` replicas (``WAIT``)."""
    on_appended: Callable[[bytes], None] | None = None
    """Given the entry's id once it is written."""
    must_exist: bool = False
    """Append only if the stream exists (NOMKSTREAM), else fail with ``StreamGone``."""
    stamp: bytes | None = None
    """A field set to this host's epoch ms as the XADD is sent (see ``append_nowait``)."""
    give_up_at: float = 0.0
    """Monotonic time past which a failed fire-and-forget append is dropped (0: not failed)."""


def now_ms() -> bytes:
    return b"%d" % (time.time() * 1000)


def _fields(item: PendingAppend, sent: bytes) -> list[bytes]:
    flat = [part for pair in item.fields.items() for part in pair]
    return flat if item.stamp is None else [*flat, item.stamp, sent]


def xadd(item: PendingAppend, sent: bytes) -> Command:
    if item.unique is not None:
        key, ttl_ms, owner = item.unique
        flat = _fields(item, sent)
        script = _XADD_IF_NEW_TO_EXISTING if item.must_exist else _XADD_IF_NEW
        return Command(item.stream, (b"EVAL", script, b"2", key, item.stream,
                                     b"%d" % ttl_ms, owner, *flat))  # fmt: skip
    return plain_xadd(item, sent)


def take(item: PendingAppend) -> Command:
    assert item.unique is not None
    key, ttl_ms, owner = item.unique
    return Command(key, (b"EVAL", _TAKE, b"1", key, b"%d" % ttl_ms, owner))


def plain_xadd(item: PendingAppend, sent: bytes) -> Command:
    args = [b"XADD", item.stream, b"NOMKSTREAM"] if item.must_exist else [b"XADD", item.stream]
    if item.maxlen is not None:
        args += [b"MAXLEN", b"~", b"%d" % item.maxlen]
    args.append(b"*")
    return Command(item.stream, (*args, *_fields(item, sent)))
