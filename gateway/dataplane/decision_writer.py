"""The decision records of closed mailboxes, appended to each deployment's decisions stream at
the end of the event-loop turn that closed them, so that their out-of-distribution scores take
one numpy pass (about 8 us a request one by one, mostly numpy's per-call overhead). An async
job's record (a 1,000-row job's took up to 20 ms on a loaded host) is written later, one a turn
between realtime requests (``RealtimeFirst``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from gateway.dataplane.decision_cap import DecisionCap
from gateway.dataplane.mailbox import Mailbox
from gateway.dataplane.realtime_first import RealtimeFirst
from rendezvous import names
from rendezvous.bus.appender import StreamAppender
from rendezvous.decision import FIELD as DECISION_FIELD
from rendezvous.decision import DecisionRecord, build_decision
from rendezvous.ood import OodScore

log = logging.getLogger(__name__)


class DecisionWriter:
    def __init__(
        self,
        decisions: StreamAppender,
        cap: DecisionCap,
        on_decision: Callable[[DecisionRecord], None] | None = None,
        realtime_first: RealtimeFirst | None = None,
    ):
        self.decisions = decisions
        self.cap = cap
        """The decisions stream's length: at most its count of records, fewer when they are
        large."""
        self.on_decision = on_decision
        """Told of each record written (the drift feed and the metrics read it)."""
        self._closing: list[Mailbox] = []
        """Mailboxes closed in this turn of the event loop, their records not yet written."""
        self.realtime_first = realtime_first or RealtimeFirst()
        self._background: deque[Mailbox] = deque()
        """Async jobs' mailboxes closed, their records written one a turn by ``_later``."""
        self._later: asyncio.Task[None] | None = None

    def add(self, mb: Mailbox) -> None:
        """A mailbox closed, answered: its record goes with this turn's others, or a job's
        in a turn of its own."""
        if mb.background:
            self._background.append(mb)
            if self._later is None or self._later.done():
                self._later = asyncio.get_running_loop().create_task(self._write_later())
            return
        if not self._closing:
            asyncio.get_running_loop().call_soon(self.flush)
        self._closing.append(mb)

    def flush(self) -> None:
        """Write the records of the mailboxes closed since the last call."""
        closing, self._closing = self._closing, []
        self._write(closing)

    async def _write_later(self) -> None:
        while self._background:
            await self.realtime_first.turn()
            if self._background:  # a stop may have written them meanwhile
                self._write([self._background.popleft()])

    async def drain(self) -> None:
        """Write every record still waiting, the jobs' too (the gateway stops)."""
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
        background, self._background = list(self._background), deque()
        self.flush()
        self._write(background)

    def _write(self, closing: list[Mailbox]) -> None:
        scores = _ood_scores(closing)
        for mb, ood in zip(closing, scores, strict=True):
            answered = mb.answered
            assert answered is not None
            record = build_decision(
                request_id=mb.request_id,
                deployment=mb.deployment,
                started_ms=mb.started_ms,
                expected_roles=mb.expected_roles,
                results=mb.results,
                chosen_role=answered.role,
                outcome=answered.outcome,
                answered_after_ms=round(answered.elapsed_ms, 4),
                schedule=mb.schedule,
                ood=ood,
            )
            fields = record.encode()
            maxlen = self.cap.maxlen(mb.deployment, len(fields[DECISION_FIELD]))
            self.decisions.append_nowait(
                names.decisions_stream(mb.deployment), fields, maxlen, urgent=False
            )
            if self.on_decision is not None:
                try:
                    self.on_decision(record)
                except Exception:
                    log.exception("decision hook failed")


def _ood_scores(mailboxes: list[Mailbox]) -> list[OodScore | None]:
    """The evidence for each record, one numpy pass per training reference; a failure costs
    those records their evidence, nothing more."""
    scores: list[OodScore | None] = [None] * len(mailboxes)
    groups: dict[int, list[int]] = {}
    for i, mb in enumerate(mailboxes):
        if mb.ood_reference is not None and mb.features is not None:
            groups.setdefault(id(mb.ood_reference), []).append(i)
    for members in groups.values():
        reference = mailboxes[members[0]].ood_reference
        assert reference is not None
        try:
            batch = reference.score_many([mailboxes[i].features for i in members])  # type: ignore[misc]
        except Exception:
            log.exception("out-of-distribution scores of %d requests failed", len(members))
            continue
        for i, score in zip(members, batch, strict=True):
            scores[i] = score
    return scores


__all__ = ["DecisionWriter"]
