"""What a worker scores of one read: each entry decoded once, whichever roles read it; the
malformed and the expired counted and acked, never scored (an answer past its deadline helps
no caller and would only delay the next)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from models.role_model import RoleModel
from rendezvous.bus import clock
from rendezvous.bus.consumer import Entry, Membership
from rendezvous.envelope import EnvelopeError, RequestEnvelope

log = logging.getLogger("models.worker")


@dataclass
class Triage:
    acks: dict[tuple[str, bytes], list[bytes]] = field(default_factory=dict)
    """(stream, group) -> every entry id read there: all are acked, scored or not."""
    live: dict[int, list[tuple[RequestEnvelope, float]]] = field(default_factory=dict)
    """id(membership) -> the envelopes to score and how long each waited (ms)."""


def triage(
    entries: list[Entry],
    members: list[Membership],
    role_of: Callable[[Membership], RoleModel],
    bus_ms: float | None,
    now_ms: float,
) -> Triage:
    """``bus_ms``: Redis's time of the read (None: this host's clock judges the deadlines)."""
    out = Triage()
    decoded: dict[tuple[str, bytes], RequestEnvelope | None] = {}
    for (stream_key, entry_id, fields), member in zip(entries, members, strict=True):
        out.acks.setdefault((stream_key, member.group_b), []).append(entry_id)
        if not fields:  # pending, but trimmed from the stream since: just let it go
            continue
        role = role_of(member)
        key = (stream_key, entry_id)
        if key in decoded:
            env = decoded[key]
        else:
            try:
                env = decoded[key] = RequestEnvelope.decode(fields)
            except EnvelopeError as exc:
                env = decoded[key] = None
                log.warning("skipping malformed entry %s: %s", entry_id, exc)
        if env is None:
            role.stats.malformed += 1
            continue
        expired, waited_ms = clock.waited(
            entry_id, env.deadline_ms, env.sent_ms or env.enqueued_ms, bus_ms, now_ms
        )
        if expired:
            role.stats.expired += 1
        else:
            out.live.setdefault(id(member), []).append((env, waited_ms))
    return out
