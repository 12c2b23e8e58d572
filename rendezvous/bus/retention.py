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

The groups' consumers are kept too: one idle for an hour with nothing pending is a process long
gone (a worker's default name holds its pid) and is removed, so that a group does not list
every reader there ever was. ``Retention`` says when each of these runs, in the log bin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Iterable

import redis

from rendezvous import names
from rendezvous.bus.aside import UNREACHABLE
from rendezvous.bus.clock import entry_order
from rendezvous.bus.connection import Client

log = logging.getLogger(__name__)

IDLE_TRIM_S = 30.0
"""How often a stream the log bin has not archived from since its last trim is trimmed."""
FORGET_EVERY_S = 600.0
"""How often the consumers long gone are removed from each stream's groups."""
GONE_CONSUMER_MS = 3_600_000
"""A consumer idle this long with nothing pending is a process long gone: a worker restarted
under a new name (its default name holds its pid), a log bin on a replaced host. Its group
would otherwise list every reader there ever was. A live consumer of a stream without traffic
can look as idle (before Redis 7.2 a read that finds nothing does not count): removed, it holds
nothing, and its next read that finds an entry makes it again."""

FORGET_GONE_CONSUMERS = b"""
local gone = 0
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 0 end
for _, g in ipairs(groups) do
  local group
  for i = 1, #g, 2 do if g[i] == 'name' then group = g[i + 1] end end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group)) do
    local name, pending, idle
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1]
      elseif c[i] == 'pending' then pending = c[i + 1]
      elseif c[i] == 'idle' then idle = c[i + 1] end
    end
    if pending == 0 and idle >= tonumber(ARGV[1]) and name ~= ARGV[2] then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, name)
      gone = gone + 1
    end
  end
end
return gone
"""
"""Remove, from every group of the stream ``KEYS[1]``, the consumers idle ``ARGV[1]`` ms or
more with nothing pending, but never ``ARGV[2]`` (the caller's own name). One script, so no
read can give such a consumer an entry between the look and the removal: a removed consumer
never takes pending entries with it (they would be nobody's, and never claimed)."""


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
        floors[name.decode() if isinstance(name, bytes) else name] = entry_order(position)
    return floors


def safe_floor(client: Client, stream: str) -> str | None:
    """The lowest id some group may still need, or None when the stream has no groups."""
    floors = group_floors(client, stream)
    if not floors:
        return None
    return _format(min(floors.values()))


class Retention:
    """When a log bin's streams are trimmed and their consumers long gone removed.

    A stream is trimmed every ``trim_interval_s`` from the time the bin archives from it until
    it is settled (no group behind the log bin's position: only the bin's next archive can free
    more), and every ``IDLE_TRIM_S`` otherwise: a trim costs two or three round trips a stream,
    and an idle host's twenty deployments trimmed every second were most of its log bin's idle
    CPU. Every ``FORGET_EVERY_S`` the consumers long gone go from each stream's groups."""

    def __init__(self, client: Client, trim_interval_s: float = 1.0, max_role_lag: int = 0):
        self.client = client
        self.trim_interval_s = trim_interval_s
        """How often the input streams are trimmed behind their slowest group (0: never)."""
        self.max_role_lag = max_role_lag
        """Model roles this far behind stop holding the streams (0: they always hold them)."""
        self._next_trim = 0.0
        self._next_idle_trim = 0.0
        self._next_forget = 0.0
        self._archived_since_trim: set[str] = set()
        """Streams trimmed every interval: archived from since they were last settled."""

    def archived(self, streams: Iterable[str]) -> None:
        """The bin archived from these streams: trim them at every interval until settled."""
        self._archived_since_trim.update(streams)

    def run(self, streams: dict[str, str], aside: Container[str]) -> int:
        """What is due on ``streams`` (stream -> deployment), but those ``aside`` (their node
        is away: done once it is back); returns how many entries were trimmed."""
        now = time.monotonic()
        if not self.trim_interval_s or now < self._next_trim:
            return 0
        self._next_trim = now + self.trim_interval_s
        every = now >= self._next_idle_trim
        if every:
            self._next_idle_trim = now + max(IDLE_TRIM_S, self.trim_interval_s)
        forget = now >= self._next_forget
        if forget:
            self._next_forget = now + FORGET_EVERY_S
        total = 0
        for stream, dep in streams.items():
            if stream in aside:
                continue
            try:
                if forget:
                    forget_gone_consumers(self.client, stream)
                if every or stream in self._archived_since_trim:
                    trimmed, settled = trim_behind_groups(
                        self.client, dep, self.max_role_lag, stream
                    )
                    total += trimmed
                    if settled:
                        self._archived_since_trim.discard(stream)
            except UNREACHABLE:  # its node is away (set aside by the reads too)
                continue
        return total


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


def forget_gone_consumers(
    client: Client, stream: str, idle_ms: int | None = None, spare: str = ""
) -> int:
    """Remove the stream's consumers gone ``idle_ms`` (default ``GONE_CONSUMER_MS``) with
    nothing pending (but ``spare``); returns how many went. 0 when the stream does not exist,
    or when Redis refuses: an ACL user without ``XGROUP`` or ``EVAL`` keeps its consumers,
    and its readers work on."""
    try:
        idle_ms = GONE_CONSUMER_MS if idle_ms is None else idle_ms
        gone = client.eval(FORGET_GONE_CONSUMERS, 1, stream, idle_ms, spare)  # type: ignore[arg-type]
    except redis.ResponseError as exc:
        if isinstance(exc, UNREACHABLE):
            raise
        log.warning("%s: gone consumers not removed: %s", stream, exc)
        return 0
    return int(gone)  # type: ignore[arg-type]


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
