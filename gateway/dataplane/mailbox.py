"""What one waiting request holds at this gateway: its mailbox (the results so far, its timer,
its answer once decided), and the answer the caller gets. The rendezvous fills mailboxes; the
decision writer turns closed ones into records."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from rendezvous.envelope import ModelResult
from rendezvous.ood import OodReference
from rendezvous.schedule import Schedule


class DuplicateRequest(ValueError):
    """A request id that is already waiting in this gateway."""


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: str
    """``real``, ``fallback``, ``pinned`` (a versioned request answered by a non-real role) or
    ``timeout``."""
    role: str | None
    result: ModelResult | None
    reason: str
    elapsed_ms: float
    failed: bool = False
    """No answer because every role that may answer failed on the request (their errors are
    in ``reason``), not because time ran out."""


@dataclass(eq=False)
class Mailbox:
    request_id: str
    deployment: str
    schedule: Schedule
    expected_roles: list[str]
    started: float
    """time.perf_counter() at open (the loop's clock may be millisecond-grained)."""
    started_ms: float
    """Epoch milliseconds at open (for the decision record)."""
    answer: asyncio.Future[Answer]
    results: dict[str, ModelResult] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    timer_at_ms: float = -1.0
    """The elapsed time ``timer`` is set for: a result that leaves it unchanged (each
    shadow bin's, in the grace period) re-arms nothing."""
    answered: Answer | None = None
    closed: bool = False
    features: np.ndarray | None = None
    ood_reference: OodReference | None = None
    """With ``features``: the input's out-of-distribution evidence goes into the record,
    measured when the mailbox closes (after the answer: off the caller's latency)."""
    input_id: bytes | None = None
    """The request's entry in its input stream, once written."""
    background: bool = False
    """An async job's: its decision record is written in a turn of its own, between
    realtime requests (``RealtimeFirst``)."""


__all__ = ["Answer", "DuplicateRequest", "Mailbox"]
