"""The background tasks a gateway process cannot serve without, and what happens if one ends.

Each loop rides out its own failures (it logs them and goes on), so a task that ends anyway is
a bug the loop did not foresee. Left alone, the process would go on half-alive, as a gateway
whose reply reader had died once did: it accepted requests and answered every one with a 504
until someone restarted it by hand. A process is cheap to restart and state lives in Redis, so
the end of a vital task stops the process, gracefully (requests in flight are answered), and
whatever supervises it starts a fresh one: ``rdv serve`` and uvicorn's worker manager restart a
process that died by a signal; under systemd use ``Restart=always``."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def stop_this_process(_name: str) -> None:
    """uvicorn's own graceful stop, through the signal it handles; once it has shut down it
    raises the signal again, so the process ends by SIGTERM (never with status 0, which
    ``rdv serve`` takes for "meant to stop" and does not restart)."""
    signal.raise_signal(signal.SIGTERM)


def keep_serving(_name: str) -> None:
    """For an app mounted in a process it does not own (a test): the end is logged, no more."""


class VitalTasks:
    """Watches tasks; the first one to end while the process is not stopping calls
    ``on_death`` with its name, once."""

    def __init__(self, on_death: Callable[[str], None] = stop_this_process):
        self.on_death = on_death
        self.dead: list[str] = []
        """Names of the watched tasks that ended unexpectedly, in order."""
        self._stopping = False

    def watch(self, name: str, task: asyncio.Task[object]) -> None:
        task.add_done_callback(lambda done: self._ended(name, done))

    def stopping(self) -> None:
        """From now on tasks end because the process stops: nothing to report."""
        self._stopping = True

    def _ended(self, name: str, task: asyncio.Task[object]) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        how = "was cancelled" if task.cancelled() else "returned" if error is None else "failed"
        log.critical(
            "%s %s while the gateway was serving; stopping this process so that it is "
            "restarted", name, how, exc_info=error,
        )  # fmt: skip
        self.dead.append(name)
        if len(self.dead) == 1:
            self.on_death(name)
