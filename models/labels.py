"""Ground-truth labels as the feedback route stores them, and the outcomes it joins them to,
read for replays and exports.

The feedback side keeps, per deployment, hashes ``rdv:{dep}:labels:<bucket>`` of request id ->
the latest label given, and ``rdv:{dep}:outcomes:<bucket>`` of request id -> what every bin
answered (``rendezvous.outcomes.Outcome``), for ``RDV_FEEDBACK_RETENTION_S``: far longer than
the decisions stream keeps its records, so a replay or an export of an older slice still knows
the answers given then. This is the one place that reads them here, so that their format can
change in one spot. A value is the feedback route's ``rendezvous.outcomes.Label`` (the true
class of each row, or only a thumbs-up/down judgement, which names no class and is skipped
here), or a plain class (``1``) or JSON (``{"label": 1}``, ``[0, 1]``). Nothing stored: ``{}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from rendezvous import names
from rendezvous.bus.connection import Client, text
from rendezvous.outcomes import BinAnswer, Label, Outcome, OutcomeFormatError, held_buckets


def label_keys(client: Client, deployment: str) -> list[str]:
    """The deployment's label hashes (one SCAN: done once per replay or export, not per
    batch), oldest bucket first so that a later one wins."""
    found = {text(k) for k in client.scan_iter(match=names.labels_pattern(deployment), count=1000)}
    return sorted(found, key=lambda k: (len(k), k))


def labels_for(
    client: Client,
    deployment: str,
    request_ids: Sequence[str],
    keys: Iterable[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """request id -> the true class of each of its rows, for the ids that have them; ``keys``
    from ``label_keys`` (looked up when None). One pipelined round trip, inside the
    deployment's hash slot."""
    if not request_ids:
        return {}
    hashes = label_keys(client, deployment) if keys is None else list(keys)
    if not hashes:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in hashes:
        pipe.hmget(key, list(request_ids))
    found: dict[str, tuple[int, ...]] = {}
    for values in pipe.execute():
        for rid, value in zip(request_ids, values, strict=True):
            labels = _labels(value)
            if labels is not None:
                found[rid] = labels
    return found


def _labels(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        return Label.decode(raw).labels  # the feedback route's form; None: a judgement only
    except OutcomeFormatError:
        pass
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, dict):
        doc = doc.get("label", doc.get("labels"))
    rows = doc if isinstance(doc, list) else [doc]
    if not rows or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows):
        return None
    return tuple(rows)


def outcome_keys(client: Client, deployment: str) -> list[str]:
    """The deployment's outcome hashes, oldest bucket first, as the writers' state hash lists
    them (one round trip)."""
    fields = client.hkeys(names.outcomes_state_key(deployment))
    return [names.outcomes_key(deployment, b) for b in held_buckets(fields)]


def outcomes_for(
    client: Client, deployment: str, request_ids: Sequence[str], keys: Iterable[str]
) -> dict[str, Outcome]:
    """request id -> its kept outcome, for the ids the outcome store still holds; ``keys`` from
    ``outcome_keys``. One pipelined round trip, inside the deployment's hash slot."""
    hashes = list(keys)
    if not request_ids or not hashes:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in hashes:
        pipe.hmget(key, list(request_ids))
    found: dict[str, Outcome] = {}
    for values in pipe.execute():
        for rid, value in zip(request_ids, values, strict=True):
            if value is None:
                continue
            try:
                found[rid] = Outcome.decode(value if isinstance(value, bytes) else value.encode())
            except OutcomeFormatError:
                continue
    return found


def as_recorded(answer: BinAnswer) -> BinAnswer:
    """A kept answer as its decision record held it: the outcome keeps the record's
    six-decimal probabilities as float32, which rounds back to exactly those decimals."""
    proba = [[round(float(p), 6) for p in row] for row in answer.probabilities]
    return answer._replace(probabilities=proba)
