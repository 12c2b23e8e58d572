"""``rdv serve``'s process supervisor: start every child, restart a crashed one with backoff,
and stop them all in a fixed order (gateway first, so nothing new comes in).

A child that exits with status 0 meant to stop (a worker whose role was removed from its
deployment, or one stopped by hand with SIGTERM): it is dropped, not restarted, and not
logged as a crash. Whoever wants it back ensures it again (``rdv serve`` reconciles workers
with the deployments every few seconds). An essential child (the gateway, the log bin, the
worker hosts) is restarted whatever its status: nothing else would start it again."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rendezvous import liveness

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0
"""A child that ran this long without crashing has its backoff reset."""


@dataclass
class Child:
    name: str
    argv: list[str]
    order: int
    """Stop order: lower stops first."""
    nice: int = 0
    """Added to the child's niceness at start (``os.nice``), for processes off the
    critical path; the child cannot take it back, so it holds across restarts."""
    pass_fds: tuple[int, ...] = ()
    """Descriptors the child inherits (the gateways' shared listening socket)."""
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff_s: float = MIN_BACKOFF_S
    restart_at: float | None = None
    wanted: bool = field(default=True)
    essential: bool = False
    """Restarted whatever its exit status: a log bin stopped with SIGTERM (exit 0) was left
    stopped, nothing archived or purged while ``/readyz`` said 200 (found by a helper)."""
    liveness_file: str = ""
    """Where it says it makes progress (``rendezvous.liveness``)."""
    progress: float | None = None
    """The progress it last said (its file's time), and when we saw that change (monotonic:
    a wall clock stepped forward, or a machine resumed from sleep, is no stall)."""
    progress_seen: float = 0.0


class Supervisor:
    def __init__(
        self,
        env: dict[str, str],
        command: list[str] | None = None,
        hung_after_s: float = 0.0,
        liveness_dir: Path | None = None,
    ):
        self.env = env
        self.command = command or [sys.executable, "-m", "gateway.cli.main"]
        """What every child runs, before its own arguments (tests run something smaller)."""
        self.children: dict[str, Child] = {}
        self.hung_after_s = hung_after_s
        """A child that said it made progress, then went this long without saying so again,
        is killed and restarted (``RDV_WATCHDOG_S``; 0: never)."""
        self._liveness_dir = ""
        """The children's liveness files: ``liveness_dir`` made anew (a killed supervisor's
        are stale), else a temporary folder."""
        if hung_after_s and liveness_dir is not None:
            shutil.rmtree(liveness_dir, ignore_errors=True)
            liveness_dir.mkdir(parents=True)
            self._liveness_dir = str(liveness_dir)
        elif hung_after_s:
            self._liveness_dir = tempfile.mkdtemp(prefix="rdv-liveness-")

    def ensure(
        self,
        name: str,
        args: list[str],
        order: int,
        nice: int = 0,
        pass_fds: tuple[int, ...] = (),
        essential: bool = False,
    ) -> None:
        """Start a child under ``name`` unless it is already supervised; an ``essential`` one
        is restarted even after a clean exit."""
        if name in self.children:
            return
        child = Child(name, [*self.command, *args], order, nice, pass_fds, essential=essential)
        self.children[name] = child
        self._spawn(child)

    def running(self, prefix: str) -> bool:
        """Whether a child whose name starts with ``prefix`` runs now."""
        return any(c.proc is not None and c.proc.poll() is None
                   for name, c in self.children.items() if name.startswith(prefix))  # fmt: skip

    def retire(self, name: str, grace_s: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            self._stop([child], grace_s)

    def _spawn(self, child: Child) -> None:
        env = {**self.env, SUPERVISED_AS: f"{os.getpid()}/{child.name}"}
        if self._liveness_dir:
            child.liveness_file = os.path.join(self._liveness_dir, child.name)
            liveness.create(child.liveness_file)
            child.progress = None
            env = {**env, liveness.ENV: child.liveness_file}
        child.proc = subprocess.Popen(
            child.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=child.pass_fds,
            **detached_from_terminal(child.nice),
        )
        child.started = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def poll(self) -> None:
        """Restart children that crashed, after their backoff; drop those that exited 0."""
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.proc is not None and child.proc.poll() is None:
                if now - child.started > STABLE_AFTER_S:
                    child.backoff_s = MIN_BACKOFF_S
                self._kill_if_hung(child)
                continue
            if child.restart_at is None:
                code = child.proc.returncode if child.proc else None
                if child.proc is not None:
                    _forget_live_gauges(child.proc.pid)
                if code == 0 and not child.essential:
                    log.info("%s exited cleanly; not restarting it", child.name)
                    del self.children[child.name]
                    continue
                child.restart_at = now + child.backoff_s
                log.error("%s exited with %s; restarting in %.1fs", child.name, code,
                          child.backoff_s)  # fmt: skip
                child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            elif now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def _kill_if_hung(self, child: Child) -> None:
        """A child that hangs does not exit: killed, it is restarted like a crashed one. One
        that has not yet said it makes progress (loading its models) is left to start."""
        if not child.liveness_file or child.proc is None:
            return
        progress = liveness.made_progress_at(child.liveness_file)
        if progress is None:
            return
        now = time.monotonic()
        if progress != child.progress:
            child.progress, child.progress_seen = progress, now
            return
        stalled_s = now - child.progress_seen
        if stalled_s > self.hung_after_s:
            log.error("%s (pid %d) made no progress for %.0f s (RDV_WATCHDOG_S is %g): it "
                      "hangs; killing it to restart it", child.name, child.proc.pid, stalled_s,
                      self.hung_after_s)  # fmt: skip
            child.proc.kill()
            child.proc.wait()

    def run(self, should_stop: Callable[[], bool], tick: Callable[[], None] | None = None) -> None:
        while not should_stop():
            self.poll()
            if tick is not None:
                tick()
            time.sleep(0.2)

    def stop_all(self, grace_s: float = 15.0) -> None:
        by_order: dict[int, list[Child]] = {}
        for child in self.children.values():
            by_order.setdefault(child.order, []).append(child)
        for order in sorted(by_order):
            self._stop(by_order[order], grace_s)
        self.children.clear()
        if self._liveness_dir:
            shutil.rmtree(self._liveness_dir, ignore_errors=True)

    @staticmethod
    def _stop(children: list[Child], grace_s: float) -> None:
        live = [c for c in children if c.proc is not None and c.proc.poll() is None]
        for c in live:
            assert c.proc is not None
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in live:
            assert c.proc is not None
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", c.name, grace_s)
                c.proc.kill()
                c.proc.wait()


SUPERVISED_AS = "RENDEZVOUS_SUPERVISED_AS"
"""Set in each child: its supervisor and its slot, the same across restarts. A child that
holds a name in Redis (a log bin, a worker host: ``models.name_owner``) holds it under this, so
a restart after a crash takes its name back at once instead of waiting out the dead one's
hold."""


def holder_token() -> str:
    """Who holds a name in Redis: this host and supervisor slot (``SUPERVISED_AS``), else
    this process."""
    return f"{socket.gethostname()}-{os.environ.get(SUPERVISED_AS) or os.getpid()}"


def _forget_live_gauges(pid: int) -> None:
    """A gateway process that died without its clean stop left its live gauges (requests in
    flight, decision records held) in the shared metrics folder, summed into every scrape for
    good (``rdv_in_flight_requests`` stuck at 3 after a kill -9; found by hand). Its counters
    stay: their totals must not fall."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid)


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


def die_with_parent() -> None:
    """In a child (before exec, or first thing): SIGTERM us if our parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def detached_from_terminal(nice: int = 0) -> dict[str, Any]:
    """Popen options for a supervised child: its own session, so a Ctrl-C in the terminal
    reaches only the supervisor, which then stops the children in order (gateway first,
    Redis last); it dies with the supervisor should that be killed outright; and it runs
    ``nice`` steps lower in CPU priority (before exec, so its whole life)."""
    options: dict[str, Any] = {"start_new_session": True}
    linux = sys.platform.startswith("linux")
    if linux or nice:

        def before_exec() -> None:
            if linux:
                die_with_parent()
            if nice:
                os.nice(nice)

        options["preexec_fn"] = before_exec
    return options
