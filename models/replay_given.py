"""What the archived requests of a slice got when they were answered, for a replay to compare
with: from their decision records while the decisions stream keeps them, else from the
outcomes the feedback route keeps (``given_of``), which hold the same answers."""

from __future__ import annotations

from collections.abc import Iterator

from models.archive_slice import Positions
from models.labels import as_recorded
from models.replay_report import Given
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.outcomes import Outcome

DECISION_SLACK_MS = 120_000
"""A decision record is written after its request (deadline and grace): the window of the
decisions stream read for a slice ends this long after its last request."""
_PAGE = 2000


def decision_records(
    client: Client, deployment: str, positions: Positions
) -> Iterator[DecisionRecord]:
    """The decision records of the slice's time window still in the decisions stream (paged
    XRANGE; the stream's cap bounds them)."""
    starts = [int(s.first.partition("-")[0]) for s in positions.values()]
    ends = [int(s.last.partition("-")[0]) for s in positions.values()]
    if not starts:
        return
    stream = names.decisions_stream(deployment)
    low: str = str(max(min(starts) - 1000, 0))
    high = str(max(ends) + DECISION_SLACK_MS)
    while True:
        entries = client.xrange(stream, min=low, max=high, count=_PAGE) or []
        yield from decode_entries(entries)
        if len(entries) < _PAGE:
            return
        last_id = entries[-1][0]
        low = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))


def load_given(client: Client, deployment: str, positions: Positions) -> dict[str, Given]:
    """request id -> what it got then, for the slice's requests whose record is still kept."""
    given: dict[str, Given] = {}
    for rec in decision_records(client, deployment, positions):
        chosen = rec.outputs.get(rec.chosen_role) if rec.chosen_role else None
        real = rec.outputs.get(names.REAL)
        given[rec.request_id] = Given(
            rec.chosen_role if chosen is not None and chosen.ok else None,
            chosen.labels if chosen is not None and chosen.ok else None,
            real.labels if real is not None and real.ok else None,
            real.probabilities if real is not None and real.ok else None,
        )
    return given


def given_of(outcome: Outcome) -> Given:
    """What a request got then, from its kept outcome (its decision record trimmed away): the
    same as ``load_given`` reads from the record (only bins that scored are kept)."""
    chosen = outcome.answers.get(outcome.chosen_role) if outcome.chosen_role else None
    real = outcome.answers.get(names.REAL)
    real_proba = as_recorded(real).probabilities if real is not None else None
    return Given(
        outcome.chosen_role if chosen is not None else None,
        list(chosen.labels) if chosen is not None else None,
        list(real.labels) if real is not None else None,
        real_proba,
    )
