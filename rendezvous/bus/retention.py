"""Trim an input stream without losing anything a reader still needs.

A blind MAXLEN could drop entries the log bin has not archived yet. Instead the floor is the
position of the slowest consumer group: its oldest pending entry if it has any, else the last
entry delivered to it. Everything below that floor has been read and acked by every group.
"""

from __future__ import annotations

import redis

from rendezvous import names


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def safe_floor(client: redis.Redis, stream: str) -> str | None:
    """The lowest id some group may still need, or None when the stream has no groups."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream
        return None
    if not groups:
        return None
    floor: tuple[int, int] | None = None
    for group in groups:
        position = group["last-delivered-id"]
        if group["pending"]:
            summary = client.xpending(stream, group["name"])
            if summary["min"] is not None:
                position = summary["min"]
        key = _id_key(position)
        floor = key if floor is None or key < floor else floor
    assert floor is not None
    return f"{floor[0]}-{floor[1]}"


def trim_input_stream(client: redis.Redis, deployment: str) -> int:
    """Drop entries every group is done with; returns how many went."""
    stream = names.input_stream(deployment)
    floor = safe_floor(client, stream)
    if floor is None or floor == "0-0":
        return 0
    # Approximate MINID only removes whole macro-nodes below the floor: never past it.
    return int(client.xtrim(stream, minid=floor, approximate=True))
