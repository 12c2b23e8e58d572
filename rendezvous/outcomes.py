"""What a label is joined to: the compact outcome of one request, and a labelled request.

A decision record (``rendezvous.decision``) holds latencies, divergences and more, about
0.65 KB; a label arriving days later needs only what each bin answered. ``Outcome`` keeps that
(role, model, version, labels, probabilities as float32, the decision time and the role that
answered) in about a fifth of the bytes, so a week of requests can be kept for the join.
``Labelled`` is one entry of the labelled stream: the label (or a right/wrong judgement of the
answer given) joined to the outcome. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from rendezvous.decision import DecisionRecord

REQUEST_FIELD = b"r"
LABEL_FIELD = b"y"
OUTCOME_FIELD = b"o"
"""The fields of a labelled-stream entry: request id, the label (msgpack), the outcome."""


_PACKER = msgpack.Packer(use_bin_type=True, use_single_float=True)
"""Probabilities as float32: five bytes each instead of nine, seven significant digits."""


def held_buckets(state_fields: Iterable[bytes | str]) -> list[int]:
    """The buckets an outcome state hash (``names.outcomes_state_key``) keeps a byte count for
    (its ``b:<bucket>`` fields), oldest first: the one list of the buckets that exist."""
    found = (f.decode() if isinstance(f, bytes) else f for f in state_fields)
    return sorted(int(f[2:]) for f in found if f.startswith("b:") and f[2:].isdigit())


def encode_record(record: DecisionRecord) -> bytes | None:
    """``Outcome.of(record).encode()`` without the objects in between (a fifth of its time:
    it runs for every request on the gateway's event loop); None when no bin scored."""
    answers = []
    for role, (model, version, _lat, _q, _arr, labels, proba, error) in record.outputs.items():
        if error is None and labels is not None:
            answers.append([role, model, version, labels, proba])
    if not answers:
        return None
    return _PACKER.pack([int(record.ts_ms), record.chosen_role, answers])  # type: ignore[no-any-return]


class OutcomeFormatError(ValueError):
    """Bytes that hold no readable outcome or label."""


class BinAnswer(NamedTuple):
    """What one bin answered for a request (only bins that scored are kept)."""

    model: str
    version: int
    labels: list[int]
    probabilities: list[list[float]]

    @property
    def model_key(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True, slots=True)
class Outcome:
    ts_ms: int
    """When the request's mailbox opened (epoch ms): which bucket it is kept in."""
    chosen_role: str | None
    """The role whose answer the caller got (None: timed out)."""
    answers: Mapping[str, BinAnswer]

    @property
    def rows(self) -> int:
        for answer in self.answers.values():
            return len(answer.labels)
        return 0

    def encode(self) -> bytes:
        answers = [[role, a.model, a.version, a.labels, a.probabilities]
                   for role, a in self.answers.items()]  # fmt: skip
        return _PACKER.pack([self.ts_ms, self.chosen_role, answers])  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, blob: bytes) -> Outcome:
        try:
            ts_ms, chosen, answers = msgpack.unpackb(blob, raw=False)
            out = {
                role: BinAnswer(model, int(version), list(labels), [list(r) for r in rows])
                for role, model, version, labels, rows in answers
            }
            return cls(int(ts_ms), chosen, out)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise OutcomeFormatError(f"unreadable outcome: {exc}") from exc

    @classmethod
    def of(cls, record: DecisionRecord) -> Outcome:
        """The outcome of a decision record: the bins that scored, nothing else."""
        answers = {
            role: BinAnswer(out.model, out.version, list(out.labels), out.probabilities)
            for role, out in record.outputs.items()
            if out.labels is not None and out.probabilities is not None
        }
        return cls(int(record.ts_ms), record.chosen_role, answers)


@dataclass(frozen=True, slots=True)
class Label:
    """What a caller said of one request: the true class of each of its rows, or whether the
    answer it got was right (``correct``), with a weight."""

    labels: tuple[int, ...] | None
    correct: bool | None
    weight: float = 1.0
    given_ms: int = 0

    def encode(self) -> bytes:
        doc = [list(self.labels) if self.labels is not None else None, self.correct,
               self.weight, self.given_ms]  # fmt: skip
        return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, blob: bytes) -> Label:
        try:
            labels, correct, weight, given_ms = msgpack.unpackb(blob, raw=False)
            return cls(None if labels is None else tuple(labels), correct, float(weight),
                       int(given_ms))  # fmt: skip
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise OutcomeFormatError(f"unreadable label: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Labelled:
    """One entry of the labelled stream: a label joined to its request's outcome."""

    request_id: str
    label: Label
    outcome: Outcome

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Labelled:
        try:
            rid = fields[REQUEST_FIELD]
            label, outcome = fields[LABEL_FIELD], fields[OUTCOME_FIELD]
        except KeyError as exc:
            raise OutcomeFormatError(f"labelled entry without {exc}") from None
        return cls(rid.decode(), Label.decode(label), Outcome.decode(outcome))


def decode_labelled(entries: list[tuple[Any, Mapping[bytes, bytes]]] | None) -> list[Labelled]:
    """The readable entries of an XRANGE/XREVRANGE reply of the labelled stream, in its order."""
    out = []
    for _id, fields in entries or ():
        try:
            out.append(Labelled.from_fields(fields))
        except OutcomeFormatError:
            continue
    return out


def label_problems(
    rows: int, labels: tuple[int, ...] | None, classes: list[int] | None
) -> str | None:
    """What is wrong with ``labels`` for a request of ``rows`` rows (None: nothing)."""
    if labels is None:
        return None
    if len(labels) != rows:
        return f"the request had {rows} rows: give {rows} labels (a list), not {len(labels)}"
    if classes:
        unknown = sorted({y for y in labels if y not in classes})
        if unknown:
            return f"label {unknown[0]} is not a class of the deployment (classes {classes})"
    return None
