"""The states of the deployments a log bin archives, as it last read them: all read in one
round trip (per node) and parsed only when they changed (a state is ~18 kB with its feature
statistics, read every few seconds); a state whose node is away is taken as last read."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from models.deployments import Deployment, StateReader
from rendezvous import names
from rendezvous.bus.aside import UNREACHABLE
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.routing import command

log = logging.getLogger(__name__)


class DeploymentStates:
    def __init__(self, bus: BlockingRouter):
        self.bus = bus
        self._known: dict[str, tuple[bytes, Deployment]] = {}
        """Each deployment's state as last read, with the bytes it was parsed from."""
        self._reader = StateReader("logbin")

    def get(self, deployment: str) -> Deployment | None:
        """The state as last read (None: none read)."""
        known = self._known.get(deployment)
        return known[1] if known is not None else None

    def read(self, deployments: Iterable[str]) -> dict[str, Deployment | None]:
        """Each deployment's state now; None for a deployment without one. Raises a Redis
        failure of a node whose states were never read."""
        valid = []
        for dep in deployments:
            try:
                valid.append(names.check_name(dep, "deployment"))
            except names.InvalidName as exc:
                log.warning("logbin: skipping deployment: %s", exc)
        commands = [command(b"GET", names.deployment_key(dep).encode()) for dep in valid]
        states: dict[str, Deployment | None] = {}
        kept: dict[str, tuple[bytes, Deployment]] = {}
        replies = self.bus.execute(commands) if valid else []
        for dep, raw in zip(valid, replies, strict=True):
            known = self._known.get(dep)
            if isinstance(raw, UNREACHABLE) and known is not None:
                # Its node is away (a master lost, its replica being elected): as last read.
                states[dep], kept[dep] = known[1], known
                continue
            if isinstance(raw, Exception):
                raise raw
            if raw is None:
                states[dep] = None
                continue
            state = (
                known[1] if known is not None and known[0] == raw else self._reader.parse(dep, raw)
            )
            if state is None:  # unreadable: as last read, else not archived until it reads
                if known is not None:
                    states[dep], kept[dep] = known[1], known
                continue
            states[dep], kept[dep] = state, (raw, state)
        self._known = kept
        return states


__all__ = ["DeploymentStates"]
