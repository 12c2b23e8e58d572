"""One process a consumer name: log bins, and worker hosts.

A log bin's consumer name is stable (``logbin-<host>`` by default), so that a restarted bin
re-reads its own pending entries at once and keeps its drift claims. Two bins started under one
name (two ``rdv logbin`` on a host without ``--consumer``) each re-read the other's pending
entries as their own and archived them twice (found by hand). A worker host names its consumers
after its own name (``real-0``): two hosts under one name (two identical ``rdv worker``) shared
one heartbeat, so a dead one was never missed, and their counters overwrote each other (found
by a helper's probe). So such a process holds its name in Redis while it runs: taken with
``SET NX`` at its start, renewed about once a second, let go at a clean stop. One killed
outright holds it ``OWNER_TTL_S`` longer, which its successor waits out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from rendezvous import names
from rendezvous.bus.connection import Client, text
from rendezvous.bus.failures import refused_for_a_while
from rendezvous.bus.routing import Command, command

log = logging.getLogger(__name__)

OWNER_TTL_S = 5.0
"""How long a name stays taken without renewal (its holder renews it about every second)."""
OWNER_TTL_MS = int(OWNER_TTL_S * 1000)
RENEW_S = 1.0


class NameTaken(RuntimeError):
    """Another live process runs under this name."""


class NameLost(RuntimeError):
    """The name this process held was taken by another while this one did not renew it (it was
    stopped or cut off from Redis past ``OWNER_TTL_S``, and a successor started meanwhile)."""


@dataclass(frozen=True)
class Kind:
    """Whose names: each kind has names of its own (the key's ``part``), and the flag that
    gives one."""

    what: str
    part: str
    flag: str


LOG_BIN = Kind("log bin", "logbin", "--consumer")
WORKER_HOST = Kind("worker host", "workerhost", "--name")


def owner_key(name: str, kind: Kind = LOG_BIN) -> str:
    return f"{names.PREFIX}:{kind.part}:owner:{name}"


def take_name(client: Client, name: str, token: str, wait_s: float = OWNER_TTL_S + 1,
              kind: Kind = LOG_BIN) -> None:  # fmt: skip
    """Hold ``name`` for this process (``token``), waiting out a holder that stopped
    renewing; ``NameTaken`` if another keeps it."""
    key = owner_key(name, kind)
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            if client.set(key, token, nx=True, px=OWNER_TTL_MS):
                return
        except redis.ResponseError as exc:
            # Redis refuses writes for a while (its disk full, at its memory limit): a start
            # now exited 1, and rdv serve restarted it with a backoff that grew to 30 s, so
            # the archive or real stayed away that long after Redis took writes again.
            why = refused_for_a_while(exc)
            if why is None:
                raise
            if not said:
                log.warning("%s %r waits to start: %s", kind.what, name, why)
                said = True
            deadline = time.monotonic() + wait_s  # no holder can renew meanwhile either
            time.sleep(0.25)
            continue
        holder = client.get(key)
        if holder is not None and text(holder) == token:
            return
        if time.monotonic() > deadline:
            raise NameTaken(
                f"another {kind.what} runs as {name!r} ({text(holder or b'?')}): "
                f"give each its own {kind.flag}"
            )
        time.sleep(0.25)


_RENEW = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
"""Renew the hold only while it is still ours (or free again): a plain ``SET`` let a process
that resumed after its hold lapsed (a host paused past 5 s, its successor started under the
same name) take the name back from the successor, and both then ran under one name for good,
renewing it in turns (a helper's multi-host probe)."""


def lost(reply: object, name: str, kind: Kind = LOG_BIN) -> NameLost | None:
    """The ``NameLost`` a renewal's reply says (0: another holds the name), else None."""
    if reply == 0:
        return NameLost(f"another {kind.what} took the name {name!r} while this one was away: "
                        "stopping, so that two do not run under one name")  # fmt: skip
    return None


def renewal(name: str, token: str, kind: Kind = LOG_BIN) -> Command:
    """The renewal as a command for a router's round trip (the log bin's acks carry it); its
    reply is 0 when another process holds the name now (``lost``)."""
    return command(b"EVAL", _RENEW.encode(), b"1", owner_key(name, kind).encode(),
                   token.encode(), b"%d" % OWNER_TTL_MS, key_at=3)  # fmt: skip


def let_go(client: Client, name: str, token: str, kind: Kind = LOG_BIN) -> None:
    """At a clean stop: the name is free at once (best effort: Redis may be down)."""
    try:
        key = owner_key(name, kind)
        holder = client.get(key)
        if holder is not None and text(holder) == token:
            client.delete(key)
    except redis.RedisError as exc:
        log.warning("%s: could not let go of its name: %s", kind.what, exc)


def keep_held(client: Client, name: str, token: str, kind: Kind,
              stop: threading.Event) -> threading.Event:  # fmt: skip
    """For a process with no loop of its own to renew in (a worker host): renew the hold
    every second on a thread of its own until ``stop``, then let go of it. Should another
    process hold the name meanwhile (``NameLost``), the returned event is set, and ``stop``."""
    name_lost = threading.Event()

    key = owner_key(name, kind)

    def renew() -> None:
        # The client's own SET: a raw command (``renewal``) through ``execute_command`` broke
        # redis-py's cluster client (a bytes command name), which ended the thread at once and
        # let the name go on every cluster (a helper's probe).
        while not stop.wait(RENEW_S):
            try:
                reply = client.eval(_RENEW, 1, key, token, OWNER_TTL_MS)
            except redis.RedisError as exc:  # Redis away: the hold is taken again on its return
                log.debug("%s: cannot renew its name now: %s", kind.what, exc)
                continue
            if (gone := lost(reply, name, kind)) is not None:
                log.critical("%s", gone)
                name_lost.set()
                stop.set()
                return
        let_go(client, name, token, kind)

    threading.Thread(target=renew, name=f"rdv-{kind.part}-name", daemon=True).start()
    return name_lost
