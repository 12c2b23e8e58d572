"""Ground-truth labels as the feedback route stores them, read for replays and exports.

The feedback side keeps, per deployment, hashes ``rdv:{dep}:labels:<bucket>`` of request id ->
the latest label given. This is the one place that reads them here, so that their format can
change in one spot: a value is a class (``1``) or a JSON object with ``label``. Nothing
stored: ``{}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from rendezvous import names
from rendezvous.bus.connection import Client, text


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
) -> dict[str, int]:
    """request id -> its label, for the ids that have one; ``keys`` from ``label_keys``
    (looked up when None). One pipelined round trip, inside the deployment's hash slot."""
    if not request_ids:
        return {}
    hashes = label_keys(client, deployment) if keys is None else list(keys)
    if not hashes:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in hashes:
        pipe.hmget(key, list(request_ids))
    found: dict[str, int] = {}
    for values in pipe.execute():
        for rid, value in zip(request_ids, values, strict=True):
            label = _label(value)
            if label is not None:
                found[rid] = label
    return found


def _label(value: Any) -> int | None:
    if value is None:
        return None
    raw = text(value)
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, dict):
        doc = doc.get("label")
    if isinstance(doc, bool) or not isinstance(doc, int | str):
        return None
    try:
        return int(doc)
    except ValueError:
        return None
