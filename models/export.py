"""Export a slice of the archive for retraining: one row per request row, as the models saw it.

Columns: ``request_id``, ``row`` (the row's index in a multi-row request; 0 otherwise), ``time``
(ISO-8601 UTC) and ``enqueued_ms``, ``stream`` and ``stream_id``, for an enriched deployment
``entity``, ``entity_found`` and ``entity_defaulted`` (``ENTITY_COLUMNS``), one column per
feature of the deployment's spec (exactly as archived: Parquet's columns are float32 as before
typed inputs, else as ``features_type`` in its metadata says), ``answered_by`` (the role whose
answer the caller got; ``none`` for none; empty when not known), then per role that answered
(real first, canary, the rest by name)
``<role>_model``, ``<role>_version``, ``<role>_label`` and ``<role>_proba_<class>`` from the
decision records still kept, else from the outcomes the feedback route keeps for
``RDV_FEEDBACK_RETENTION_S`` (the same answers and six decimals; empty when both are gone), and
``label`` (the row's true class) where the feedback route stored one. The file names the stream
positions it covers (Parquet: the ``rdv`` metadata of its footer; CSV: ``FILE.meta.json``), so
the same slice can be taken again.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.archive import ArchiveReader
from models.archive_slice import Positions, positions_json, read
from models.labels import as_recorded, label_keys, labels_for, outcome_keys, outcomes_for
from models.replay_given import decision_records
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.decision import DecisionRecord
from rendezvous.input_types import FLOAT32, FLOAT64, INT64
from rendezvous.outcomes import BinAnswer

FORMATS = ("parquet", "csv")
_CHUNK = 5000
"""Rows written at a time (bounds the memory of a large export)."""


def _roles(found: set[str]) -> list[str]:
    first = [r for r in (names.REAL, names.CANARY) if r in found]
    return first + sorted(found - set(first))


def _answers(record: DecisionRecord) -> dict[str, BinAnswer]:
    """Every bin's answer that scored, as an outcome keeps it."""
    return {
        role: BinAnswer(out.model, out.version, list(out.labels), out.probabilities or [])
        for role, out in record.outputs.items()
        if out.ok and out.labels is not None
    }


ENTITY_COLUMNS = ["entity", "entity_found", "entity_defaulted"]
"""An enriched deployment's rows: the entity named, whether the store had it, and the looked-up
features a default filled (comma-separated; empty when none did)."""


NO_ANSWER = "none"
"""``answered_by`` of a request no role answered (a timeout, a failure); empty (null) is a
request whose decision record and kept outcome are both gone: not known."""


def _answered_by(record: DecisionRecord) -> str:
    """The role whose answer the caller got, or ``NO_ANSWER``."""
    if record.chosen_role is None:
        return NO_ANSWER
    chosen = record.outputs.get(record.chosen_role)
    return record.chosen_role if chosen is not None and chosen.ok else NO_ANSWER


def _entity(looked_up: Any, k: int) -> dict[str, Any]:
    entry = looked_up[k] if isinstance(looked_up, list) and k < len(looked_up) else None
    if not isinstance(entry, dict):
        return dict.fromkeys(ENTITY_COLUMNS)
    defaulted = entry.get("defaulted") or []
    return {
        "entity": entry.get("entity"),
        "entity_found": entry.get("found"),
        "entity_defaulted": ",".join(map(str, defaulted)) if isinstance(defaulted, list) else "",
    }


def features_type(seen: set[str]) -> str:
    """The type of a Parquet file's feature columns, from the types its records carry:
    float32 as the models saw it (every record as before typed inputs), int64 when every one
    is an integer model's, else float64, which holds each of them exactly (a slice across a
    change of model type)."""
    if seen <= {FLOAT32}:
        return FLOAT32
    return INT64 if seen == {INT64} else FLOAT64


def iso_ms(ms: float | None) -> str | None:
    """Epoch ms as ISO-8601 UTC to the millisecond, as the ``time`` column."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _at_once(read: Callable[[], Any]) -> Any:
    return read()


class Exporter:
    def __init__(
        self,
        client: Client,
        reader: ArchiveReader,
        deployment: str,
        feature_names: Sequence[str],
        classes: Sequence[int],
        entity_key: str | None = None,
        labels_since_ms: float | None = None,
        ride: Callable[[Callable[[], Any]], Any] | None = None,
    ):
        """``entity_key``: the deployment looks features up by this key (its rows then say
        which entity, whether the store had it, and which features a default filled);
        ``labels_since_ms``: labels of requests before it are gone from Redis (their buckets
        expired with the feedback retention), counted as ``rows_past_label_retention``;
        ``ride``: runs each Redis read, again through a failover (the CLI's patience): only
        the first two lookups of ``rdv archive export`` were, and a Redis restart a second
        into an export ended it (a helper's live check)."""
        self.client = client
        self.ride = ride or _at_once
        self.reader = reader
        self.deployment = deployment
        self.feature_names = list(feature_names)
        self.classes = list(classes)
        self.entity_key = entity_key
        self.labels_since_ms = labels_since_ms
        self.past_retention = 0
        """Rows exported of requests older than ``labels_since_ms``: an empty label there
        says nothing (a label sent then is gone; a helper's probe read them as unlabelled)."""
        self.outcome_keys: list[str] = []
        self.answered_by: dict[str, str] = {}
        """Request id -> the role whose answer the caller got, from its decision record."""

    def columns(self, roles: list[str]) -> list[str]:
        cols = ["request_id", "row", "time", "enqueued_ms", "stream", "stream_id"]
        if self.entity_key is not None:
            cols += ENTITY_COLUMNS
        cols += self.feature_names
        cols.append("answered_by")
        for role in roles:
            cols += [f"{role}_model", f"{role}_version", f"{role}_label"]
            cols += [f"{role}_proba_{c}" for c in self.classes]
        return [*cols, "label"]

    def survey(
        self, positions: Positions, outputs: dict[str, dict[str, BinAnswer]], types: bool
    ) -> tuple[set[str], set[str]]:
        """One pass over the slice before any row is written (the columns come first): the
        roles of its requests whose decision record is gone, from the outcomes kept (a round
        trip per chunk), and, when ``types``, the feature types its records carry."""
        roles: set[str] = set()
        seen: set[str] = set()
        if not self.outcome_keys and not types:
            return roles, seen
        gone: list[str] = []
        for record in read(self.reader, self.deployment, positions):
            if types:
                seen.add(str(record.get("features_type") or FLOAT32))
            if not self.outcome_keys:
                continue
            rid = str(record.get("request_id", ""))
            if rid not in outputs:
                gone.append(rid)
            if len(gone) >= _CHUNK:
                roles |= self._kept_roles(gone)
                gone = []
        return roles | self._kept_roles(gone), seen

    def _kept_roles(self, ids: list[str]) -> set[str]:
        found = self.ride(lambda: outcomes_for(self.client, self.deployment, ids,
                                               self.outcome_keys))  # fmt: skip
        return {role for outcome in found.values() for role in outcome.answers}

    def rows(
        self, positions: Positions, outputs: dict[str, dict[str, BinAnswer]], roles: list[str],
        skipped: dict[str, int], held: collections.Counter[str],
    ) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
        """Chunks of rows, each chunk's labels (and the outcomes of requests whose decision
        record is gone) looked up in one round trip."""
        keys = self.ride(lambda: label_keys(self.client, self.deployment))
        width = len(self.feature_names)
        chunk: list[dict[str, Any]] = []
        for record in read(self.reader, self.deployment, positions):
            stream = str(record.get("stream") or names.input_stream(self.deployment))
            held[stream] += 1
            features = record.get("features")
            if not features or any(len(row) != width for row in features):
                why = "undecodable" if not features else "width"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            rid = str(record.get("request_id", ""))
            exact = int if record.get("features_type") == INT64 else float
            since = self.labels_since_ms
            if since is not None and float(record.get("enqueued_ms") or 0) < since:
                self.past_retention += len(features)
            for k, values in enumerate(features):
                row: dict[str, Any] = {
                    "request_id": rid,
                    "row": k,
                    "time": iso_ms(record.get("enqueued_ms")),
                    "enqueued_ms": record.get("enqueued_ms"),
                    "stream": stream,
                    "stream_id": record["stream_id"],
                }
                if self.entity_key is not None:
                    row.update(_entity(record.get("looked_up"), k))
                row.update(zip(self.feature_names, map(exact, values), strict=True))
                chunk.append(row)
            if len(chunk) >= _CHUNK:
                yield self._complete(chunk, keys, outputs, roles)
                chunk = []
        if chunk:
            yield self._complete(chunk, keys, outputs, roles)

    def _output(self, role: str, out: BinAnswer | None, k: int) -> dict[str, Any]:
        scored = out is not None and k < len(out.labels)
        doc: dict[str, Any] = {
            f"{role}_model": out.model if scored and out else None,
            f"{role}_version": out.version if scored and out else None,
            f"{role}_label": out.labels[k] if scored and out else None,
        }
        proba = out.probabilities[k] if scored and out and out.probabilities else None
        for j, c in enumerate(self.classes):
            doc[f"{role}_proba_{c}"] = proba[j] if proba is not None and j < len(proba) else None
        return doc

    def _complete(
        self, chunk: list[dict[str, Any]], keys: list[str],
        outputs: dict[str, dict[str, BinAnswer]], roles: list[str],
    ) -> list[dict[str, Any]]:  # fmt: skip
        ids = sorted({row["request_id"] for row in chunk})
        gone = [rid for rid in ids if rid not in outputs]
        kept_outcomes = self.ride(lambda: outcomes_for(self.client, self.deployment, gone,
                                                       self.outcome_keys))  # fmt: skip
        kept = {
            rid: {role: as_recorded(answer) for role, answer in outcome.answers.items()}
            for rid, outcome in kept_outcomes.items()
        }
        answered_by = self.answered_by
        known = self.ride(lambda: labels_for(self.client, self.deployment, ids, keys))
        chosen = {rid: o.chosen_role or NO_ANSWER for rid, o in kept_outcomes.items()}
        for row in chunk:
            rid = row["request_id"]
            answers = outputs.get(rid) or kept.get(rid, {})
            row["answered_by"] = answered_by.get(rid, chosen.get(rid))
            for role in roles:
                row.update(self._output(role, answers.get(role), row["row"]))
            truth = known.get(row["request_id"])
            row["label"] = truth[row["row"]] if truth and row["row"] < len(truth) else None
        return chunk

    def export(self, positions: Positions, out: Path, fmt: str, meta: dict[str, Any]) -> dict:
        """Write the file; returns its metadata (positions, rows, roles, ...)."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        outputs: dict[str, dict[str, BinAnswer]] = {}
        records = self.ride(lambda: list(decision_records(self.client, self.deployment,
                                                          positions)))  # fmt: skip
        for rec in records:
            outputs[rec.request_id] = _answers(rec)
            self.answered_by[rec.request_id] = _answered_by(rec)
        self.outcome_keys = self.ride(lambda: outcome_keys(self.client, self.deployment))
        found = {role for outs in outputs.values() for role in outs}
        kept, types = self.survey(positions, outputs, types=fmt == "parquet")
        roles = _roles(found | kept)
        if not self.classes:  # no model metadata at hand: class indices, as wide as the outputs
            widths = [len(o.probabilities[0]) for outs in outputs.values()
                      for o in outs.values() if o.probabilities]  # fmt: skip
            self.classes = list(range(max(widths, default=0)))
        columns = self.columns(roles)
        skipped: dict[str, int] = {}
        doc = {
            **meta,
            "deployment": self.deployment,
            "positions": positions_json(positions),
            "feature_names": self.feature_names,
            "classes": self.classes,
            "roles": roles,
            "columns": columns,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "skipped": skipped,
        }
        if fmt == "parquet":
            doc["features_type"] = features_type(types)
        # what each span holds, counted as it is read: positions given back without their
        # counts (an export by ``--positions``) said ``records: 0`` however many it wrote
        held: collections.Counter[str] = collections.Counter()

        def chunks() -> Iterator[list[dict[str, Any]]]:
            yield from self.rows(positions, outputs, roles, skipped, held)
            doc["positions"] = positions_json(
                {s: replace(span, records=held[s]) for s, span in positions.items()}
            )  # before the writer adds the metadata
            doc["rows_past_label_retention"] = self.past_retention

        with written_whole(out) as path:
            written = (
                _parquet(path, columns, chunks(), self, roles, doc)
                if fmt == "parquet"
                else _csv(path, columns, chunks())
            )
            doc["rows"] = written
            if fmt == "csv":
                with written_whole(Path(f"{out}.meta.json")) as meta_path:
                    meta_path.write_text(json.dumps(doc, indent=2) + "\n")
        return doc


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """The path to write ``out`` through: a file beside it, put in its place once written
    whole, and removed if the writing fails. A disk that filled mid-export left a cut CSV
    (or an empty Parquet file) over the previous export, beside that export's
    ``.meta.json`` (a helper's disk probe). Not a regular file (``/dev/stdout``, a pipe):
    written as it is."""
    if out.exists() and not out.is_file():
        yield out
        return
    part = out.with_name(f".{out.name}.partial")
    try:
        yield part
        os.replace(part, out)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename == str(part):
            exc.filename = str(out)  # the message names the file asked for
        raise


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may take as the start of a formula (OWASP's CSV injection)."""


def _cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula gets a leading apostrophe (a
    caller's X-Request-Id, an admin's feature name); numbers are written as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv(out: Path, columns: list[str], chunks: Iterator[list[dict[str, Any]]]) -> int:
    written = 0
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([_cell(name) for name in columns])
        for chunk in chunks:
            # repr of a float (what csv writes) reads back as the same float
            writer.writerows([_cell(row.get(k)) for k in columns] for row in chunk)
            written += len(chunk)
    return written


def _parquet(
    out: Path,
    columns: list[str],
    chunks: Iterator[list[dict[str, Any]]],
    exporter: Exporter,
    roles: list[str],
    doc: dict[str, Any],
) -> int:
    """Typed columns (features as the models saw them: float32, or exactly as the archive kept
    them, ``features_type``; labels and versions int64,
    probabilities float64 as the decision records keep them); the metadata is written in the
    footer, after the rows (its row count included)."""
    import pyarrow as pa  # only an export needs it
    import pyarrow.parquet as pq

    fields = [
        pa.field("request_id", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("time", pa.string()),
        pa.field("enqueued_ms", pa.float64()),
        pa.field("stream", pa.string()),
        pa.field("stream_id", pa.string()),
    ]
    feature = {FLOAT32: pa.float32(), INT64: pa.int64()}.get(doc["features_type"], pa.float64())
    if exporter.entity_key is not None:
        fields += [pa.field("entity", pa.string()), pa.field("entity_found", pa.bool_()),
                   pa.field("entity_defaulted", pa.string())]  # fmt: skip
    fields += [pa.field(n, feature) for n in exporter.feature_names]
    fields.append(pa.field("answered_by", pa.string()))
    for role in roles:
        fields += [pa.field(f"{role}_model", pa.string()), pa.field(f"{role}_version", pa.int64()),
                   pa.field(f"{role}_label", pa.int64())]  # fmt: skip
        fields += [pa.field(f"{role}_proba_{c}", pa.float64()) for c in exporter.classes]
    fields.append(pa.field("label", pa.int64()))
    schema = pa.schema(fields)
    assert schema.names == columns
    written = 0
    with pq.ParquetWriter(out, schema) as writer:
        for chunk in chunks:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            written += len(chunk)
        if written == 0:
            writer.write_table(schema.empty_table())
        writer.add_key_value_metadata({"rdv": json.dumps({**doc, "rows": written})})
    return written
