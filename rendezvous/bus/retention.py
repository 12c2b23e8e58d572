"""Trim an input stream without losing anything a reader still needs.

A blind MAXLEN could drop entries the log bin has not archived yet. Instead the floor is the
position of the slowest consumer group: its oldest pending entry if it has any, else the last
entry delivered to it. Everything below that floor has been read and acked by every group.

Only the log bin's archive is a durability promise. A model role whose worker stays down (or
cannot keep up) would hold the stream until the backlog bound turns every predict into a 503;
so once the stream holds more than ``max_role_lag`` entries and the slowest group is a model
role's, that group is moved forward to where the next slowest group stands (its pending entries
there acked), the skipped entries counted in ``rdv:{dep}:skipped``. The roles that answer go on
answering; a worker that comes back resumes at its group's new position.
"""

from __future__ import annotations

import logging

import redis

from rendezvous import names
from rendezvous.bus.connection import Client

log = logging.getLogger(__name__)


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def group_floors(client: Client, stream: str) -> dict[str, tuple[int, int]]:
    """Each group's lowest id it may still need: its oldest pending entry, else the last
    entry delivered to it ({} when the stream or its groups do not exist)."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream
        return {}
    floors = {}
    for group in groups:
        position = group["last-delivered-id"]
        if group["pending"]:
            summary = client.xpending(stream, group["name"])
            if summary["min"] is not None:
                position = summary["min"]
        name = group["name"]
        floors[name.decode() if isinstance(name, bytes) else name] = _id_key(position)
    return floors


def safe_floor(client: Client, stream: str) -> str | None:
    """The lowest id some group may still need, or None when the stream has no groups."""
    floors = group_floors(client, stream)
    if not floors:
        return None
    return _format(min(floors.values()))


def trim_input_stream(
    client: Client, deployment: str, max_role_lag: int = 0, stream: str | None = None
) -> int:
    """Drop entries every group is done with, and release model roles that lag more than
    ``max_role_lag`` entries (0: never), in one input partition (``stream``; default the
    first); returns how many entries went. Each partition is bounded on its own."""
    return trim_behind_groups(client, deployment, max_role_lag, stream)[0]


def trim_behind_groups(
    client: Client, deployment: str, max_role_lag: int = 0, stream: str | None = None
) -> tuple[int, bool]:
    """``trim_input_stream``, and whether the stream is *settled*: no group still needs an
    entry below the log bin's position, so nothing more can go until the log bin reads on
    (a stream without groups counts as settled)."""
    stream = stream or names.input_stream(deployment)
    floors = group_floors(client, stream)
    if not floors:
        return 0, True
    low = min(floors.values())
    floor = _format(low)
    # Approximate MINID only removes whole macro-nodes below the floor: never past it.
    trimmed = 0 if floor == "0-0" else int(client.xtrim(stream, minid=floor, approximate=True))
    if max_role_lag:
        trimmed += _release_laggards(client, deployment, stream, max_role_lag)
    own = floors.get(names.LOGBIN_GROUP)
    return trimmed, own is not None and low == own


def _release_laggards(client: Client, deployment: str, stream: str, max_lag: int) -> int:
    trimmed = 0
    while client.xlen(stream) > max_lag:
        floors = group_floors(client, stream)
        slowest = min(floors, key=floors.__getitem__)
        others = [f for g, f in floors.items() if g != slowest]
        if not slowest.startswith(names.MODEL_GROUP_PREFIX) or not others:
            return trimmed  # the log bin's position is a promise: never moved
        target = min(others)
        if target <= floors[slowest]:
            return trimmed
        target_id = f"{target[0]}-{target[1]}"
        # Exactly: what goes now is what the role skips (an approximate trim leaves some).
        client.xtrim(stream, minid=_format(floors[slowest]), approximate=False)
        _ack_below(client, stream, slowest, target_id)
        client.xgroup_setid(stream, slowest, target_id)
        skipped = int(client.xtrim(stream, minid=target_id, approximate=False))
        role = slowest.removeprefix(names.MODEL_GROUP_PREFIX)
        client.hincrby(names.skipped_key(deployment), role, skipped)
        log.warning(
            "%s/%s fell more than %d entries behind: its group moved past %d entries (its "
            "worker resumes from there)", deployment, role, max_lag, skipped,
        )  # fmt: skip
        trimmed += skipped
    return trimmed


def _ack_below(client: Client, stream: str, group: str, below_id: str) -> None:
    """Ack the group's pending entries older than ``below_id`` (they are skipped)."""
    while True:
        pending = client.xpending_range(stream, group, min="-", max=f"({below_id}", count=1000)
        if not pending:
            return
        client.xack(stream, group, *[p["message_id"] for p in pending])


def _format(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"
