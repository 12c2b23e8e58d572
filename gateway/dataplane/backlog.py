"""Who holds a deployment's input backlog: the reader furthest behind, said in the backlog
bound's 503 (``gateway.dataplane.backlog_bound``) and logged once a spell.

An input stream is trimmed only behind its slowest consumer group (``rendezvous.bus.retention``),
so a backlog past ``RDV_MAX_BACKLOG`` is one reader behind: the log bin (down, hung, or failing
to write its archive) or a model role within ``RDV_MAX_ROLE_LAG``. The 503 said only "N entries
not yet consumed by every reader" while ``/readyz`` said ready, and nothing was logged, so an
operator had to find the reader by hand (a helper's probe). The deployments refresh reads, in
its own round trip and only for a deployment whose backlog is past half a bound, each
partition's groups, the deployment's live workers and the log bins' counters: the request path
reads the answer from memory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from rendezvous import names
from rendezvous.bus.clock import entry_order
from rendezvous.bus.connection import text

LOGBIN_QUIET_S = 10.0
"""A log bin publishes its counters about once a second: one not heard from for this long is
hung or gone (``/readyz`` says ``ok`` until 60 s)."""

LOGBIN_GONE_S = 60.0
"""Counters older than this are a log bin gone (as ``/readyz`` and ``/metrics`` judge it)."""


@dataclass(frozen=True)
class Behind:
    """The reader furthest behind in a deployment's input."""

    who: str
    """The reader and what is known of why, in words that stay the same while it lasts (the
    log line of a spell)."""
    detail: str
    """``who`` with figures of the moment (pending entries, seconds since heard from)."""


def _reader(group: str) -> str:
    if group == names.LOGBIN_GROUP:
        return f"the log bin (consumer group {group!r})"
    if group.startswith(names.MODEL_GROUP_PREFIX):
        role = group[len(names.MODEL_GROUP_PREFIX) :]
        return f"the {role} role's workers (consumer group {group!r})"
    return f"consumer group {group!r}"


def _logbin_state(logbins: Any, now_s: float) -> tuple[str, str]:
    """(stable, with figures) words on the log bins' own counters."""
    if not isinstance(logbins, dict):
        return "", ""
    newest = None
    failing = ""
    for raw in logbins.values():
        try:
            doc = json.loads(raw)
            ts = float(doc.get("ts", 0))
        except (ValueError, TypeError, AttributeError):
            continue
        if now_s - ts >= LOGBIN_GONE_S:
            continue
        newest = ts if newest is None else max(newest, ts)
        failing = failing or str(doc.get("failing") or "")
    if newest is None:
        words = f"no log bin has published its counters for {LOGBIN_GONE_S:.0f} s (none running?)"
        return words, words
    if failing:
        words = f"the log bin says it fails: {failing}"
        return words, words
    quiet = now_s - newest
    if quiet >= LOGBIN_QUIET_S:
        return ("the log bin is not heard from (hung or gone?)",
                f"the log bin was last heard from {quiet:.0f} s ago (hung or gone?)")  # fmt: skip
    return "", ""


def slowest_reader(
    partitions: list[Any], live: Any, logbins: Any, now_s: float | None = None
) -> Behind | None:
    """The reader furthest behind from one read of each partition's ``XINFO GROUPS``
    (``partitions``; an error where the stream is missing), the deployment's live worker
    members (``live``) and the log bins' counters (``logbins``); None when no group is known.
    Furthest behind: the lowest last delivered id (what trimming waits for, but for entries a
    group read and has not acked: its ``pending``, said too)."""
    now_s = time.time() if now_s is None else now_s
    position: dict[str, tuple[int, int]] = {}
    pending: dict[str, int] = {}
    lag: dict[str, int | None] = {}
    for groups in partitions:
        if not isinstance(groups, list):
            continue
        for group in groups:
            name = text(group.get("name", b""))
            at = entry_order(group.get("last-delivered-id") or b"0-0")
            position[name] = min(position.get(name, at), at)
            pending[name] = pending.get(name, 0) + int(group.get("pending") or 0)
            if "lag" in group:  # Redis 7: entries not yet delivered (None: unknown)
                before = lag.get(name, 0)
                now_lag = group["lag"]
                lag[name] = None if before is None or now_lag is None else before + int(now_lag)
    if not position:
        return None
    # The lowest position; of equals, the one holding the most read and not acked.
    slowest = min(position, key=lambda g: (position[g], -pending[g]))
    who = _reader(slowest)
    figures = [f"{pending[slowest]} read and not acked"]
    if lag.get(slowest) is not None:
        figures.insert(0, f"{lag[slowest]} not yet read")
    why, why_now = "", ""
    if slowest == names.LOGBIN_GROUP:
        why, why_now = _logbin_state(logbins, now_s)
    elif slowest.startswith(names.MODEL_GROUP_PREFIX) and isinstance(live, list):
        role = slowest[len(names.MODEL_GROUP_PREFIX) :]
        count = sum(1 for m in live if text(m).split("|", 1)[0] == role)
        why = why_now = "no live worker" if not count else ""
        figures.append(f"{count} live worker{'s' if count != 1 else ''}")
    stable = f"furthest behind: {who}" + (f"; {why}" if why else "")
    detail = f"furthest behind: {who}: {', '.join(figures)}" + (f"; {why_now}" if why_now else "")
    return Behind(stable, detail)
