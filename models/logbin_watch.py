"""The feature detectors as the log bin drives them.

The bin decodes every archived request anyway, so it hands the rows to the detectors
(``FeatureWatch``) and lets their alert claims ride in its own round trips (the ack's, or one
of their own on an idle read). The archive must never depend on them: every call here logs a
failure of the detectors and returns, where the bin's own failures are raised to its loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from models.feature_watch import FeatureWatch
from rendezvous import names
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.routing import Command, command
from rendezvous.envelope import RequestEnvelope

log = logging.getLogger("models.logbin")


class DetectorRelay:
    """``watch`` None: no detectors in this bin, and every call does nothing."""

    def __init__(self, watch: FeatureWatch | None, bus: BlockingRouter):
        self.watch = watch
        self.bus = bus

    def adopt(self, deployments: list[str]) -> None:
        """The alerts this bin's source claimed before this process started (its consumer name
        is the same after a restart), handed to the watch to hold."""
        if not deployments or self.watch is None:
            return
        source = self.watch.source.encode()
        commands = [command(b"HGET", names.drift_claims_key(d).encode(), source)
                    for d in deployments]  # fmt: skip
        try:
            claims = self.bus.execute(commands)
        except REDIS_FAILURES as exc:
            log.warning("logbin: cannot read the alerts claimed before the start: %s", exc)
            return
        for dep, claim in zip(deployments, claims, strict=True):
            if not isinstance(claim, Exception):  # its node away: nothing held
                self.watch.adopt(dep, claim)

    def observe(self, envelopes: Mapping[str, list[RequestEnvelope]]) -> None:
        """The archived rows, by deployment, then a judgement of the windows that are due."""
        if self.watch is None:
            return
        try:
            for dep, envs in envelopes.items():
                for env in envs:
                    self.watch.observe(dep, env)
            self.watch.judge(due_only=True)
        except Exception:
            log.exception("logbin: the feature watch failed")

    def judge_kept(self) -> None:
        """An idle read: the rows kept for the detectors are judged now, however few."""
        if self.watch is None:
            return
        try:
            self.watch.judge()
        except Exception:
            log.exception("logbin: the feature watch failed")

    def claim_alone(self) -> None:
        """Renew the alerts' claims when no batch came to carry them."""
        if self.watch is None or not self.watch.due():
            return
        commands: list[Command] = []
        queued = self.queue(commands)
        if queued:
            self.replies(queued, self.bus.execute(commands))

    def queue(self, commands: list[Command]) -> list[str]:
        """Append the claims that are due to ``commands``; returns what was queued."""
        if self.watch is None:
            return []
        try:
            return self.watch.queue(commands)
        except Exception:
            log.exception("logbin: the feature watch failed")
            return []

    def unsent(self, queued: list[str]) -> None:
        """The round trip that carried ``queued`` failed: they are due again."""
        if self.watch is not None:
            self.watch.unsent(queued)

    def replies(self, queued: list[str], replies: list[Any]) -> None:
        if self.watch is None or not queued:
            return
        try:
            self.watch.replies(queued, replies)
        except Exception:
            log.exception("logbin: the feature watch failed")
