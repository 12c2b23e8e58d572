"""A supervised process says it still makes progress by setting the time of a file its
supervisor names (``RENDEZVOUS_LIVENESS_FILE``); ``rdv serve`` kills a child whose file has gone
stale, and restarts it as it restarts a crashed one (systemd's ``WatchdogSec`` does the same
with a socket). A process that hangs (a deadlock, a call that never returns, a ``SIGSTOP``)
does not exit: before, nothing restarted it, so a hung real worker had every request answered
by the fallback, and ``/readyz`` said 503, until a person came.

The time written is that of the process's slowest loop's last step, not of the write: a host
whose main thread is fine while one of its hosted models is stuck writes the same time again,
and the supervisor counts, on its own monotonic clock, how long that time has not moved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

ENV = "RENDEZVOUS_LIVENESS_FILE"
"""Set by the supervisor for each child: not an ``RDV_`` setting, which the operator sets."""
WRITE_EVERY_S = 1.0
"""At most one write a second: the supervisor judges in tens of seconds."""


class Liveness:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._next_write = 0.0

    @classmethod
    def from_env(cls) -> Liveness:
        """The file this process's supervisor watches, if one does."""
        return cls(os.environ.get(ENV) or None)

    def beat(self, progressed_at: float | None = None) -> None:
        """Record that every loop of this process stepped at or after ``progressed_at``
        (epoch seconds; default: now)."""
        if self.path is None:
            return
        now = time.monotonic()
        if now < self._next_write:
            return
        self._next_write = now + WRITE_EVERY_S
        at = time.time() if progressed_at is None else progressed_at
        # the supervisor made it (gone only while it stops), and judges from it: a write that
        # fails is nothing this process could mend
        with contextlib.suppress(OSError):
            os.utime(self.path, (at, at))


async def beat_every(interval_s: float = WRITE_EVERY_S) -> None:
    """An event loop's beat: it stops when the loop is held up (a call that blocks it)."""
    liveness = Liveness.from_env()
    while liveness.path is not None:
        liveness.beat()
        await asyncio.sleep(interval_s)


def made_progress_at(path: str) -> float | None:
    """The time a supervised process last said it made progress, or None before it first
    did (the supervisor creates the file with time 0)."""
    try:
        at = os.stat(path).st_mtime
    except OSError:
        return None
    return at if at > 0 else None


def create(path: str) -> None:
    """The supervisor's side: an empty file whose time says "not yet"."""
    with open(path, "wb"):
        pass
    os.utime(path, (0, 0))
