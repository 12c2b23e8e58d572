"""How far a deployment's archive is complete: the request time before which the log bin has
archived every request.

An export or a replay "until now" used to take whatever the archive held, while the log bin
still had requests to write (behind, restarting, or stopped for a moment): a file said it
covered until now and silently lacked them, and a pipeline exporting from its last ``to``
lost them for good (a helper's probe: 661 of 13,348 records). Capped at this time, the next
window, from the cap on, finds them.

The oldest request not archived is the oldest entry the log bin's group has not acked (read
but not yet written, or left pending by a bin that died) or not yet read, on any input
partition. Its time is the earlier of its stream id's (Redis's clock) and its request time
(the gateway's); requests stamped by gateways whose clocks run behind Redis's by more than
the cap's margin could still fall before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import redis

from rendezvous import names
from rendezvous.bus.clock import entry_order
from rendezvous.bus.connection import Client, text
from rendezvous.envelope import RequestEnvelope


def archived_until_ms(client: Client, streams: Iterable[str]) -> float | None:
    """The time (epoch ms) of the oldest request of ``streams`` not yet archived, or None when
    the log bin holds none back (everything is archived up to now)."""
    oldest: list[float] = []
    for stream in streams:
        entry = _oldest_unarchived(client, stream)
        if entry is not None:
            oldest.append(_entry_ms(*entry))
    return min(oldest) if oldest else None


OPEN_TO_MARGIN_MS = 1000
"""An export's open ``to`` ("until now") ends this long before now: a request stamped before
now can reach Redis after the archive's frontier is read (a few milliseconds usually, 237 ms
seen around a failover), and the next window, starting after this one's ``to_ms``, would never
hold it. (A replay until its creation needs no margin: no window follows it.)"""


def open_to_ms(now_ms: float) -> int:
    return math.floor(now_ms) - OPEN_TO_MARGIN_MS


def last_archived_ms(until_ms: float | None, to_ms: float, margin_ms: int = 0) -> int:
    """``to_ms`` (inclusive to the end of its millisecond, so whole milliseconds), capped
    before the millisecond of ``until_ms``, less ``margin_ms``: a window that ends there holds
    no request the log bin has yet to write. The margin covers requests behind the oldest
    unarchived one in the stream but stamped before it (appends reach Redis out of their
    stamps' order across a stall: up to 610 ms in a helper's probe)."""
    if until_ms is None:
        return math.floor(to_ms)
    return min(math.floor(to_ms), math.floor(until_ms) - 1 - margin_ms)


def _oldest_unarchived(client: Client, stream: str) -> tuple[bytes, dict[bytes, bytes]] | None:
    try:
        groups: list[dict[str, Any]] = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream: purged, or no request yet
        return None
    group = next((g for g in groups if text(g["name"]) == names.LOGBIN_GROUP), None)
    if group is None:  # no log bin has read it yet: all of it waits
        return _first(client.xrange(stream, count=1))
    if int(group.get("pending") or 0):
        summary = client.xpending(stream, names.LOGBIN_GROUP)
        if summary.get("min") is not None:
            pending = _first(client.xrange(stream, summary["min"], summary["min"], count=1))
            if pending is not None:
                return pending
    delivered = text(group.get("last-delivered-id") or "0-0")
    return _first(client.xrange(stream, f"({delivered}", count=1))


def _first(entries: Any) -> tuple[bytes, dict[bytes, bytes]] | None:
    if not entries:
        return None
    entry_id, fields = entries[0]
    return entry_id, fields


def _entry_ms(entry_id: bytes, fields: dict[bytes, bytes]) -> float:
    at_ms = float(entry_order(entry_id)[0])
    try:
        return min(at_ms, RequestEnvelope.decode(fields).enqueued_ms)
    except Exception:  # an entry that does not decode is archived as such: its id's time
        return at_ms
