"""Wire formats of the bus: the request envelope and a model's result.

Each travels as one msgpack blob in the stream field ``d``, except that the results a worker's
batch owes one gateway travel together, in one entry's field ``r``. Feature and probability
matrices are raw little-endian float32 bytes with their shape beside them, so decoding is a
``frombuffer`` and not a walk over JSON floats. A deployment whose models take float64 or
integers carries its features as float64 or int64 bytes, the type named in ``xt`` (an envelope
without it, as every older one, is float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from rendezvous.input_types import DTYPES, FLOAT32, WIRE_TYPES

FIELD = b"d"
SENT_FIELD = b"t"
"""Beside ``d`` in a request's entry: the gateway's epoch ms as its XADD was sent (the
appender sets it; ``RequestEnvelope.sent_ms``)."""
FORMAT_VERSION = 1


class EnvelopeError(ValueError):
    """A stream entry that is not a well-formed envelope or result."""


def _matrix_to_wire(matrix: np.ndarray) -> tuple[bytes, int, int]:
    m = np.ascontiguousarray(matrix, dtype="<f4")
    if m.ndim != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {m.shape}")
    return m.tobytes(), int(m.shape[0]), int(m.shape[1])


def _typed_to_wire(matrix: np.ndarray, wire_type: str) -> tuple[bytes, int, int]:
    if wire_type not in WIRE_TYPES:
        raise ValueError(f"unknown feature type {wire_type!r}")
    m = np.ascontiguousarray(matrix, dtype=DTYPES[wire_type])
    if m.ndim != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {m.shape}")
    return m.tobytes(), int(m.shape[0]), int(m.shape[1])


def _matrix_from_wire(data: bytes, rows: int, cols: int) -> np.ndarray:
    if len(data) != rows * cols * 4:
        raise EnvelopeError(f"matrix of {len(data)} bytes does not hold {rows}x{cols} float32")
    return np.frombuffer(data, dtype="<f4").reshape(rows, cols)


def _features_from_wire(doc: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The features and their wire type: float32 unless ``xt`` says otherwise."""
    wire = doc.get("xt")
    if wire is None:
        return _matrix_from_wire(doc["x"], doc["rows"], doc["cols"]), FLOAT32
    if wire not in WIRE_TYPES:
        raise EnvelopeError(f"unknown feature type {str(wire)[:20]!r}")
    dtype = DTYPES[wire]
    data, rows, cols = doc["x"], doc["rows"], doc["cols"]
    if len(data) != rows * cols * dtype.itemsize:
        raise EnvelopeError(f"matrix of {len(data)} bytes does not hold {rows}x{cols} {wire}")
    return np.frombuffer(data, dtype=dtype).reshape(rows, cols), wire


def _unpack(fields: dict[bytes, bytes]) -> dict[str, Any]:
    blob = fields.get(FIELD)
    if blob is None:
        raise EnvelopeError("stream entry has no 'd' field")
    try:
        doc = msgpack.unpackb(blob, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeError(f"undecodable envelope: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        raise EnvelopeError("unknown envelope format")
    return doc


def _sent_ms(value: bytes | None) -> float | None:
    try:
        return None if value is None else float(int(value))
    except ValueError:
        return None


@dataclass(slots=True)
class RequestEnvelope:
    """One prediction request as every bin sees it (and the log bin archives it).

    Not frozen, like ``ModelResult``: a frozen dataclass sets each field through
    ``object.__setattr__``, two and a half times the cost of building it, and every bin decodes
    every envelope. Treat it as read-only."""

    request_id: str
    deployment: str
    reply_to: str
    deadline_ms: int
    """Absolute deadline, epoch milliseconds: after it nobody waits for a score."""
    enqueued_ms: float
    """When the gateway published the request, epoch milliseconds (for queue-wait time)."""
    raw: bytes
    """The caller's input as received (JSON), kept for the archive and for replays."""
    features: np.ndarray
    """Model-ready matrix, one row per instance: float32, or as ``wire_type`` says."""
    spec_version: str
    looked_up: list[dict[str, Any]] | None = None
    """What enrichment read from the online feature store, one entry per row (``entity``,
    ``found``, ``values`` by feature, ``defaulted`` when a default filled in); None when the
    deployment looks nothing up. ``features`` already holds these values merged in."""
    raw_is_json: bool = False
    """The gateway parsed ``raw`` as JSON and accepted it (its own predict route), so the
    archive may splice it in without parsing it again (a 100-row body: ~70 us of the log
    bin's CPU); False, and the log bin checks, for any other protocol."""
    wire_type: str = FLOAT32
    """``float64`` or ``int64`` for a deployment whose models take doubles or integers
    (``rendezvous.input_types``): the features travel so, exactly as validated."""
    job: str = ""
    """The async job this request is a run of (empty for a realtime predict): a job run again
    after its gateway died publishes its input again, and the archive's readers keep one."""
    sent_ms: float | None = None
    """When the gateway sent the XADD (the entry's ``t``, on the gateway's clock as
    ``deadline_ms``), later than ``enqueued_ms`` by a wait in its appender; None for an entry
    without (older gateways). Not part of ``encode``: the appender stamps it."""

    def encode(self) -> dict[bytes, bytes]:
        if self.wire_type == FLOAT32:
            data, rows, cols = _matrix_to_wire(self.features)
        else:
            data, rows, cols = _typed_to_wire(self.features, self.wire_type)
        doc = {
            "v": FORMAT_VERSION,
            "id": self.request_id,
            "dep": self.deployment,
            "reply": self.reply_to,
            "deadline_ms": self.deadline_ms,
            "enq_ms": self.enqueued_ms,
            "raw": self.raw,
            "x": data,
            "rows": rows,
            "cols": cols,
            "spec": self.spec_version,
        }
        if self.looked_up is not None:
            doc["lu"] = self.looked_up
        if self.raw_is_json:
            doc["rj"] = True
        if self.wire_type != FLOAT32:
            doc["xt"] = self.wire_type
        if self.job:
            doc["job"] = self.job
        return {FIELD: msgpack.packb(doc, use_bin_type=True)}

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> RequestEnvelope:
        doc = _unpack(fields)
        try:
            features, wire_type = _features_from_wire(doc)
            return cls(
                request_id=doc["id"],
                deployment=doc["dep"],
                reply_to=doc["reply"],
                deadline_ms=int(doc["deadline_ms"]),
                enqueued_ms=float(doc["enq_ms"]),
                raw=doc["raw"],
                features=features,
                spec_version=doc["spec"],
                looked_up=doc.get("lu"),
                raw_is_json=doc.get("rj") is True,
                wire_type=wire_type,
                job=job if isinstance(job := doc.get("job", ""), str) else "",
                sent_ms=_sent_ms(fields.get(SENT_FIELD)),
            )
        except (KeyError, TypeError) as exc:
            raise EnvelopeError(f"envelope lacks a field: {exc}") from exc


@dataclass(slots=True)
class ModelResult:
    """What one model bin answered for one request (all of its rows).

    Not frozen: the gateway decodes one per bin and request, and a frozen dataclass's
    ``__init__`` (a ``object.__setattr__`` per field) took 1.3 of its 2.3 µs. Treat it as
    read-only (only ``extra`` is written, by the rendezvous)."""

    request_id: str
    deployment: str
    model: str
    version: int
    role: str
    labels: list[int]
    probabilities: np.ndarray
    """float32 matrix, rows x classes, columns in the order of ``classes``."""
    classes: list[int]
    model_latency_ms: float
    """Time inside onnxruntime for the batch this request was part of."""
    queue_ms: float
    """Time from the gateway's publish to the worker's read."""
    error: str | None = None
    """Set when the bin could not score the request; the rendezvous then moves on at once."""
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[bytes, bytes]:
        """One result as its own entry (field ``d``); workers write ``encode_results``."""
        return {FIELD: msgpack.packb(self._doc(), use_bin_type=True)}

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> ModelResult:
        return cls._from_doc(_unpack(fields))

    def _doc(self) -> dict[str, Any]:
        data, rows, cols = _matrix_to_wire(self.probabilities)
        doc: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "id": self.request_id,
            "dep": self.deployment,
            "model": self.model,
            "ver": self.version,
            "role": self.role,
            "labels": self.labels,
            "p": data,
            "rows": rows,
            "cols": cols,
            "classes": self.classes,
            "lat_ms": self.model_latency_ms,
            "q_ms": self.queue_ms,
        }
        if self.error is not None:
            doc["err"] = self.error
        if self.extra:
            doc["extra"] = self.extra
        return doc

    @classmethod
    def _from_doc(cls, doc: Any) -> ModelResult:
        try:
            return cls(
                request_id=doc["id"],
                deployment=doc["dep"],
                model=doc["model"],
                version=int(doc["ver"]),
                role=doc["role"],
                labels=list(doc["labels"]),
                probabilities=_matrix_from_wire(doc["p"], doc["rows"], doc["cols"]),
                classes=list(doc["classes"]),
                model_latency_ms=float(doc["lat_ms"]),
                queue_ms=float(doc["q_ms"]),
                error=doc.get("err"),
                extra=doc.get("extra") or {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, EnvelopeError):
                raise
            raise EnvelopeError(f"result lacks a field: {exc}") from exc

    @property
    def ok(self) -> bool:
        return self.error is None


RESULTS_FIELD = b"r"
"""A reply entry holding every result a worker's batch owes one gateway: one XADD, one stream
entry and one msgpack decode for many requests, instead of one each."""


def encode_results(results: list[ModelResult]) -> dict[bytes, bytes]:
    doc = {"v": FORMAT_VERSION, "results": [r._doc() for r in results]}
    return {RESULTS_FIELD: msgpack.packb(doc, use_bin_type=True)}


def decode_results(fields: dict[bytes, bytes]) -> tuple[list[ModelResult], list[str]]:
    """The results of one reply entry, batched (``r``) or single (``d``, as older workers
    wrote), and why any of them could not be read. An entry that is not a reply at all
    raises ``EnvelopeError``."""
    if RESULTS_FIELD not in fields:
        return [ModelResult.decode(fields)], []
    try:
        doc = msgpack.unpackb(fields[RESULTS_FIELD], raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeError(f"undecodable results: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        raise EnvelopeError("unknown results format")
    docs = doc.get("results")
    if not isinstance(docs, list):
        raise EnvelopeError("results entry holds no list of results")
    results: list[ModelResult] = []
    errors: list[str] = []
    for one in docs:
        try:
            results.append(ModelResult._from_doc(one))
        except EnvelopeError as exc:
            errors.append(str(exc))
    return results, errors
