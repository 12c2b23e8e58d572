"""The decision record: one per request, written after the grace period.

It holds every bin's output and latency, the role that answered (or the timeout), which bins
never answered, the split draw when the deployment has an A/B split, and the divergence of
every other bin from real (``divergences``; ``divergence`` is the real-vs-canary one, the drift
signal). It is the raw material of the gateway's metrics, of drift tracking and of the shadow
records that gate a promotion (``rendezvous.evidence``).

Pure vocabulary: the typed record, how it is built from the bins' results, and its wire form
(one msgpack map in the decisions stream). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np

from rendezvous.divergence import Divergence, divergence
from rendezvous.envelope import ModelResult
from rendezvous.names import CANARY, REAL
from rendezvous.ood import OodScore
from rendezvous.schedule import Schedule

FIELD = b"m"
"""The stream field of a record: one msgpack map (a fifth of JSON's encoding time on the
gateway's hot path, four fifths of its size in Redis)."""


class DecisionFormatError(ValueError):
    """A stream entry that holds no readable decision record."""


class BinOutput(NamedTuple):
    """What one bin answered, as the record keeps it: latencies to 0.1 µs, probabilities to
    six decimals. ``labels`` and ``probabilities`` are set when it scored, ``error`` when it
    could not (exactly one of the two).

    A named tuple rather than a frozen dataclass: a record makes one per bin on the gateway's
    event loop, and a tuple is built in a quarter of the time."""

    model: str
    version: int
    model_latency_ms: float
    """Time inside onnxruntime for the worker's batch this request was part of."""
    queue_ms: float
    """From the gateway's publish to the worker's read."""
    arrived_ms: float | None
    """When the result reached the rendezvous, from the request's start."""
    labels: list[int] | None = None
    probabilities: list[list[float]] | None = None
    """Rows x classes (lists as they travel; treat them as read-only)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def model_key(self) -> str:
        """``model:version``, as metrics label it and the record pairs models."""
        return f"{self.model}:{self.version}"

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BinOutput:
        return cls(
            doc["model"],
            doc["version"],
            doc["model_latency_ms"],
            doc["queue_ms"],
            doc.get("arrived_ms"),
            doc.get("labels"),
            doc.get("probabilities"),
            doc.get("error"),
        )


@dataclass(frozen=True, slots=True)
class SplitDraw:
    """The A/B split's draw for this request (only when the deployment has a split)."""

    seed: int
    draw: float | None
    assigned: str
    """The role the draw made primary."""

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draw": self.draw, "assigned": self.assigned}


def _divergence_from(doc: Mapping[str, Any]) -> Divergence:
    """``disagreement_rate`` is derived and ``pair`` comes from the outputs: neither is read."""
    return Divergence(
        rows=doc["rows"],
        disagreements=doc["disagreements"],
        abs_diff_mean=doc["abs_diff_mean"],
        abs_diff_max=doc["abs_diff_max"],
        js_mean=doc["js_mean"],
        js_max=doc["js_max"],
    )


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One request's record. Build it with ``build_decision``; ``encode``/``decode`` are its
    stream form, ``to_dict`` its JSON view (``rdv decisions``)."""

    request_id: str
    deployment: str
    ts_ms: float
    """Epoch milliseconds when the request's mailbox opened."""
    outcome: str
    """``real``, ``split``, ``fallback`` or ``timeout``."""
    chosen_role: str | None
    """The role whose answer the caller got; None on timeout."""
    answered_after_ms: float
    """When the caller was answered (or timed out), from the request's start."""
    outputs: Mapping[str, BinOutput]
    """Every bin that answered before the record was written, in arrival order."""
    missing: tuple[str, ...]
    """Expected bins that never answered."""
    divergences: Mapping[str, Divergence]
    """Every other bin that scored, against real (empty unless real scored)."""
    split: SplitDraw | None = None
    divergence_errors: Mapping[str, str] = field(default_factory=dict)
    """Roles whose output could not be compared with real's, and why."""
    ood: OodScore | None = None
    """How far the input lay from the training data, per row (``rendezvous.ood``); None in
    records written before it, or for a spec without training statistics."""

    @property
    def failed(self) -> list[str]:
        """Bins that answered with an error."""
        return [role for role, out in self.outputs.items() if out.error is not None]

    @property
    def divergence(self) -> Divergence | None:
        """Real against canary: the drift signal."""
        return self.divergences.get(CANARY)

    def pair(self, role: str) -> tuple[str, str]:
        """The ``model:version`` of real and of ``role``, for a role in ``divergences``."""
        return self.outputs[REAL].model_key, self.outputs[role].model_key

    # -- wire form ---------------------------------------------------------------------------

    def _doc(self, with_divergence: bool) -> dict[str, Any]:
        """The map the previous release wrote, key for key and in its order: ``divergence``
        is stored once, under ``divergences`` (a quarter of a record's bytes, and the decisions
        stream is most of Redis's memory), so the wire holds ``divergence: nil`` only when
        there is no real-vs-canary figure. ``with_divergence`` always writes it (JSON view)."""
        # Loops, not comprehensions (each is a call of its own before 3.12), and each output
        # unpacked at once: this runs per request on the gateway's event loop.
        outputs = self.outputs
        wire_outputs: dict[str, Any] = {}
        failed: list[str] = []
        for role, (model, version, lat_ms, q_ms, arrived, labels, proba, error) in outputs.items():
            if error is None:
                wire_outputs[role] = {
                    "model": model,
                    "version": version,
                    "model_latency_ms": lat_ms,
                    "queue_ms": q_ms,
                    "arrived_ms": arrived,
                    "labels": labels,
                    "probabilities": proba,
                }
            else:
                wire_outputs[role] = {
                    "model": model,
                    "version": version,
                    "model_latency_ms": lat_ms,
                    "queue_ms": q_ms,
                    "arrived_ms": arrived,
                    "error": error,
                }
                failed.append(role)
        doc: dict[str, Any] = {
            "request_id": self.request_id,
            "deployment": self.deployment,
            "ts_ms": self.ts_ms,
            "outcome": self.outcome,
            "chosen_role": self.chosen_role,
            "answered_after_ms": self.answered_after_ms,
            "outputs": wire_outputs,
            "missing": self.missing,
            "failed": failed,
        }
        wire: dict[str, Any] = {}
        if self.divergences:
            real = f"{outputs[REAL].model}:{outputs[REAL].version}"  # model_key, inlined
            for role, div in self.divergences.items():
                other = outputs[role]
                wire[role] = {
                    "rows": div.rows,
                    "disagreements": div.disagreements,
                    "disagreement_rate": div.disagreement_rate,
                    "abs_diff_mean": div.abs_diff_mean,
                    "abs_diff_max": div.abs_diff_max,
                    "js_mean": div.js_mean,
                    "js_max": div.js_max,
                    "pair": [real, f"{other.model}:{other.version}"],
                }
        if with_divergence:
            doc["divergence"] = wire.get(CANARY)
        elif CANARY not in wire:
            doc["divergence"] = None
        doc["divergences"] = wire
        if self.split is not None:
            doc["split"] = self.split.to_dict()
        if self.divergence_errors:
            doc["divergence_errors"] = dict(self.divergence_errors)
        if self.ood is not None:
            doc["ood"] = self.ood.to_dict() if with_divergence else self.ood.wire()
        return doc

    def encode(self) -> dict[bytes, bytes]:
        """The stream entry's fields."""
        return {FIELD: msgpack.packb(self._doc(False), use_bin_type=True)}

    @classmethod
    def decode(cls, fields: Mapping[bytes, bytes]) -> DecisionRecord:
        """A record from its stream entry's fields, as every release wrote them (the same map;
        records written before 34c06fa also held ``divergence`` beside ``divergences``, and
        it is read from ``divergences`` alike). The JSON records (field ``d``) of the first
        development builds, which no release wrote, are not read."""
        blob = fields.get(FIELD)
        if blob is None:
            raise DecisionFormatError(f"no decision record (field {FIELD!r}) in the entry")
        try:
            doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise DecisionFormatError(f"undecodable decision record: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> DecisionRecord:
        """A record from its map (the wire's, or ``to_dict``'s)."""
        try:
            outputs = {role: BinOutput.from_dict(o) for role, o in doc["outputs"].items()}
            divergences = {
                role: _divergence_from(d) for role, d in (doc.get("divergences") or {}).items()
            }
            if divergences and not (REAL in outputs and divergences.keys() <= outputs.keys()):
                raise DecisionFormatError("a divergence without both outputs")
            split, ood = doc.get("split"), doc.get("ood")
            return cls(
                request_id=doc["request_id"],
                deployment=doc["deployment"],
                ts_ms=doc["ts_ms"],
                outcome=doc["outcome"],
                chosen_role=doc["chosen_role"],
                answered_after_ms=doc["answered_after_ms"],
                outputs=outputs,
                missing=tuple(doc["missing"]),
                divergences=divergences,
                split=None if split is None else SplitDraw(**split),
                divergence_errors=doc.get("divergence_errors") or {},
                ood=None if ood is None else OodScore.from_dict(ood),
            )
        except DecisionFormatError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DecisionFormatError(f"malformed decision record: {exc!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON shows it: the wire's map with ``divergence`` (real against
        canary, or null) always present."""
        doc = self._doc(True)
        for out in doc["outputs"].values():  # copies: the caller may change what it gets
            if "labels" in out:
                out["labels"] = list(out["labels"])
                out["probabilities"] = [list(row) for row in out["probabilities"]]
        doc["missing"] = list(self.missing)
        return doc


def decode_entries(
    entries: Iterable[tuple[object, Mapping[Any, Any] | None]] | None,
) -> list[DecisionRecord]:
    """The records of an XRANGE/XREVRANGE reply, in its order (entries emptied by a trim are
    skipped)."""
    return [DecisionRecord.decode(fields) for _id, fields in entries or () if fields]


# -- building a record from the bins' results ---------------------------------------------------

# ``float(_MS % x)`` is ``round(x, 4)`` (the same correctly rounded decimal, read back) at half
# its cost, and likewise ``_P`` for six decimals: a record rounds eight numbers or more on the
# gateway's event loop.
_MS = "%.4f"
_P = "%.6f"


_VECTOR_FROM = 16
"""Probabilities from this many values up are rounded by numpy (8 µs whatever the size) rather
than one by one in Python (0.8 µs a value): a 100-row request's two bins took 0.5 ms of the
gateway's event loop. Both give the same floats (none of 200,000 float32 values differed)."""


def _rounded(probabilities: np.ndarray) -> list[list[float]]:
    """Rows x classes to six decimals, as Python floats (JSON and msgpack write them fast)."""
    if probabilities.size >= _VECTOR_FROM:
        return np.round(probabilities.astype(np.float64), 6).tolist()  # type: ignore[no-any-return]
    rows = probabilities.tolist()  # Python floats first: numpy scalars format slowly
    return [[float(_P % p) for p in row] for row in rows]


def _output(result: ModelResult) -> BinOutput:
    latency = float(_MS % result.model_latency_ms)
    queue = float(_MS % result.queue_ms)
    arrived = result.extra.get("arrived_ms")
    if result.error is None:
        probabilities = _rounded(result.probabilities)
        return BinOutput(result.model, result.version, latency, queue, arrived,
                         result.labels, probabilities, None)  # fmt: skip
    return BinOutput(result.model, result.version, latency, queue, arrived, None, None,
                     result.error)  # fmt: skip


def build_decision(
    *,
    request_id: str,
    deployment: str,
    started_ms: float,
    expected_roles: list[str],
    results: Mapping[str, ModelResult],
    chosen_role: str | None,
    outcome: str,
    answered_after_ms: float,
    schedule: Schedule | None = None,
    ood: OodScore | None = None,
) -> DecisionRecord:
    """``outcome`` is ``real``, ``split``, ``pinned``, ``fallback`` or ``timeout``;
    ``chosen_role`` is None on timeout; ``ood`` is the input's out-of-distribution evidence."""
    outputs: dict[str, BinOutput] = {}
    divergences: dict[str, Divergence] = {}
    errors: dict[str, str] = {}
    real = results.get(REAL)
    if real is not None and real.error is not None:
        real = None  # nothing to compare with
    for role, result in results.items():  # one loop, no comprehension: the event loop's time
        outputs[role] = _output(result)
        if real is not None and role != REAL and result.error is None:
            try:
                divergences[role] = divergence(
                    real.labels, real.probabilities, result.labels, result.probabilities
                )
            except ValueError as exc:
                errors[role] = str(exc)
    missing: tuple[str, ...] = ()
    for role in expected_roles:
        if role not in results:
            missing += (role,)
    split = None
    if schedule is not None and schedule.splits:
        split = SplitDraw(schedule.split_seed, schedule.draw, schedule.primary)
    return DecisionRecord(
        request_id,
        deployment,
        started_ms,
        outcome,
        chosen_role,
        answered_after_ms,
        outputs,
        missing,
        divergences,
        split,
        errors,
        ood,
    )
