"""One process a log-bin consumer name.

A log bin's consumer name is stable (``logbin-<host>`` by default), so that a restarted bin
re-reads its own pending entries at once and keeps its drift claims. Two bins started under one
name (two ``rdv logbin`` on a host without ``--consumer``) each re-read the other's pending
entries as their own and archived them twice (found by hand). So a bin holds its name in Redis
while it runs: taken with ``SET NX`` at its start, renewed with its counters (about once a
second), let go at a clean stop. A bin killed outright holds it ``OWNER_TTL_S`` longer, which
its successor waits out.
"""

from __future__ import annotations

import logging
import time

import redis

from rendezvous import names
from rendezvous.bus.connection import Client, text
from rendezvous.bus.routing import Command, command

log = logging.getLogger(__name__)

OWNER_TTL_S = 5.0
"""How long a name stays taken without renewal (the counters renew it about every second)."""


class NameTaken(RuntimeError):
    """Another live log bin runs under this consumer name."""


def owner_key(consumer: str) -> str:
    return f"{names.PREFIX}:logbin:owner:{consumer}"


def take_name(client: Client, consumer: str, token: str, wait_s: float = OWNER_TTL_S + 1) -> None:
    """Hold ``consumer`` for this process (``token``), waiting out a holder that stopped
    renewing; ``NameTaken`` if another keeps it."""
    key = owner_key(consumer)
    deadline = time.monotonic() + wait_s
    while not client.set(key, token, nx=True, px=int(OWNER_TTL_S * 1000)):
        holder = client.get(key)
        if holder is not None and text(holder) == token:
            return
        if time.monotonic() > deadline:
            raise NameTaken(
                f"another log bin runs as consumer {consumer!r} ({text(holder or b'?')}): "
                "give each its own --consumer"
            )
        time.sleep(0.25)


def renewal(consumer: str, token: str) -> Command:
    return command(b"SET", owner_key(consumer).encode(), token.encode(), b"PX",
                   b"%d" % int(OWNER_TTL_S * 1000))  # fmt: skip


def let_go(client: Client, consumer: str, token: str) -> None:
    """At a clean stop: the name is free at once (best effort: Redis may be down)."""
    try:
        key = owner_key(consumer)
        holder = client.get(key)
        if holder is not None and text(holder) == token:
            client.delete(key)
    except redis.RedisError as exc:
        log.warning("logbin: could not let go of its name: %s", exc)
