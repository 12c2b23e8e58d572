"""The backlog bound (``RDV_MAX_BACKLOG``, ``RDV_MAX_BACKLOG_BYTES``): a deployment whose input
holds too much not yet consumed by every reader takes no new predict or job (503), naming the
reader furthest behind (``gateway.dataplane.backlog``)."""

from __future__ import annotations

import logging
from typing import NoReturn

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import Backlogged
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)


class BacklogBound:
    """Refuses a deployment's predicts and job submissions (503) while its input, as the
    deployments refresh last read it, holds too much not yet consumed by every reader."""

    def __init__(self, deployments: DeploymentCache, max_entries: int, max_bytes: int = 2**62):
        self.deployments = deployments
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        deployments.watch_from = (max_entries // 2, max_bytes // 2)
        self._spells: dict[str, RetryLog] = {}
        """Deployment -> the log of its spells of refusals."""

    def refusal(self, deployment: str) -> tuple[str, str] | None:
        """(the bound, the 503's detail) when the deployment's backlog is past a bound; else
        None. The detail names the reader furthest behind when the refresh has read it (past
        half the bound)."""
        backlog = self.deployments.backlog.get(deployment, 0)
        if backlog >= self.max_entries:
            bound = f"RDV_MAX_BACKLOG={self.max_entries} entries"
            detail = (
                f"deployment {deployment} has {backlog} entries not yet consumed by every reader"
            )
        elif (size := self.deployments.backlog_bytes.get(deployment, 0)) >= self.max_bytes:
            bound = f"RDV_MAX_BACKLOG_BYTES={self.max_bytes}"
            detail = (f"deployment {deployment} has {size // 2**20} MB of entries not yet "
                      "consumed by every reader")  # fmt: skip
        else:
            return None
        behind = self.deployments.behind.get(deployment)
        if behind is None:
            return bound, detail
        return f"{bound}; {behind.who}", f"{detail}; {behind.detail}"

    def check(self, deployment: str) -> None:
        """Refuse past a bound, logging the spell: when it starts or its reader changes, then
        every 30 s, and its end (the first request taken again), not a line per refusal."""
        refused = self.refusal(deployment)
        if refused is not None:
            self._refuse(deployment, *refused)
        if self._spells and (spell := self._spells.get(deployment)) is not None:
            spell.succeeded()  # "working again after 41.2s (3120 failed tries)"

    def _refuse(self, deployment: str, bound: str, detail: str) -> NoReturn:
        spell = self._spells.get(deployment)
        if spell is None:
            what = f"deployment {deployment}: the input backlog refuses predicts and jobs (503)"
            spell = self._spells[deployment] = RetryLog(log, what)
        spell.failed(f"past {bound}")
        raise Backlogged(detail)


__all__ = ["BacklogBound"]
