"""The Open Inference Protocol v2's wire format (KServe v2, what Triton and MLServer speak),
without a server, the request's side: the JSON part of an inference request
(``InferenceRequest``) and its tensors read into an ``InferRequest`` (``parse_infer``), whose
``matrix`` is the deployment's feature matrix (``columns``, any named columns of it). Numbers
come as FP32 or FP64 (INT64 or INT32 too for a deployment of an integer model); BYTES
(strings) only as the entity ids of a deployment that looks features up
(``gateway.transport.oip_lookup``). The answer's side is ``gateway.transport.oip_answer``.

The binary tensor data extension is spoken both ways, as ``tritonclient.http`` uses it by
default: a body whose ``Inference-Header-Content-Length`` header says how long its JSON part
is, followed by each binary input's little-endian bytes in input order (``binary_data_size``
in the input's ``parameters``); outputs are sent the same way when asked for
(``binary_data`` on a requested output, or ``binary_data_output`` on the request). A binary
BYTES input is, per element, its length (4 bytes, little-endian) and then its UTF-8 bytes.

It does no I/O and builds no response: a refusal is FastAPI's ``RequestValidationError``, as
the data plane's own validation raises it, which the service counts and ``problem_of`` makes a
422. It is one protocol's wire format, so it lives with the transport that speaks it (the
routes in ``gateway.transport.oip``); the data plane takes any protocol's ``Decoder``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gateway.problems import encoding_fault
from gateway.transport.oip_schema import (
    BYTES,
    DTYPES,
    HEADER_LENGTH,
    INPUT,
    MAX_ID_CHARS,
    MAX_VALUES,
    OUTPUTS,
    InferenceRequest,
    RequestInput,
)
from rendezvous.request_ids import is_request_id
from rendezvous.spec import FeatureSpec

MISSING_SHOWN = 3
"""Missing features named one by one up to this many; past it, the count and the first few."""


def _fault(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


def _invalid(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> Exception:
    return RequestValidationError([_fault(loc, msg, kind)])


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    values: np.ndarray
    """float64 or float32 (int64 or int32 as binary data), or str objects for BYTES, already
    in ``shape``."""
    datatype: str = "FP64"
    """As the request named it."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    """An inference request, checked as far as it can be without the deployment's spec."""

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, bool], ...]
    """(name, binary) of each output to answer, in answer order."""

    def refuse_integers(self, integer: str | None) -> None:
        """A 422 for an INT64 or INT32 input unless the deployment has an integer model
        (``integer``: its rule's integer type): a float model's rows are float32, which would
        round such integers past 2**24 unseen. Triton refuses a datatype its model does not
        declare the same way."""
        if integer is not None:
            return
        for i, t in enumerate(self.inputs):
            if t.datatype in ("INT64", "INT32"):
                raise _invalid(("inputs", i, "datatype"), f"input {t.name!r} has datatype "
                               f"{t.datatype!r}: this deployment's models take FP32 or FP64 "
                               "(INT64 and INT32 are for one with an integer model)",
                               "datatype")  # fmt: skip

    def matrix(self, spec: FeatureSpec) -> np.ndarray:
        """The rows x ``spec.width`` matrix (float64 or float32; ``check_matrix`` makes it the
        finite float32 the models take), or RequestValidationError."""
        return self.columns(spec.names)

    def columns(self, names: Sequence[str], skip: str | None = None) -> np.ndarray:
        """The rows x ``len(names)`` matrix of those features, from one input ``INPUT`` or
        one input per feature; the input named ``skip`` (entity ids) left aside."""
        inputs = [(i, t) for i, t in enumerate(self.inputs) if t.name != skip]
        width = len(names)
        for i, t in inputs:
            if t.values.dtype == object:
                raise _invalid(("inputs", i, "datatype"), f"input {t.name!r} is BYTES: features "
                               "are FP32 or FP64 (BYTES is for the entity ids of a deployment "
                               "that looks features up)", "datatype")  # fmt: skip
        if any(t.name == INPUT for _, t in inputs):
            if len(inputs) > 1:
                raise _invalid(("inputs",), f"send one input {INPUT!r} or one input per "
                                            "feature, not both")  # fmt: skip
            [(i, tensor)] = inputs
            if len(tensor.shape) != 2 or tensor.shape[1] != width:
                raise _invalid(("inputs", i, "shape"), f"input {INPUT!r} has shape "
                               f"{list(tensor.shape)}: the model takes [rows, {width}]",
                               "wrong_shape")  # fmt: skip
            return tensor.values
        known = set(names)
        faults = [
            _fault(
                ("inputs", i, "name"),
                f"unknown input {t.name!r}: the model takes "
                f"{INPUT!r} [rows, {width}], or one input per feature named as in its "
                "feature spec",
                "unknown_input",
            )
            for i, t in inputs
            if t.name not in known
        ]
        given = {t.name: t for _, t in inputs}
        missing = [name for name in names if name not in given]
        if len(missing) > MISSING_SHOWN:  # one line, not one a feature (30 for a wrong name)
            shown = ", ".join(repr(name) for name in missing[:MISSING_SHOWN])
            more = len(missing) - MISSING_SHOWN
            faults.append(_fault(("inputs",), f"missing inputs for {len(missing)} features: "
                                 f"{shown} and {more} more", "missing"))  # fmt: skip
        else:
            faults += [_fault(("inputs",), f"missing input for feature {name!r}", "missing")
                       for name in missing]  # fmt: skip
        if faults:
            raise RequestValidationError(faults)
        first = inputs[0][1]
        rows = first.shape[0] if first.shape else 0
        for i, t in inputs:
            if t.shape not in ((rows,), (rows, 1)):
                raise _invalid(("inputs", i, "shape"), f"input {t.name!r} has shape "
                               f"{list(t.shape)}: a feature's input is [rows] or [rows, 1] "
                               f"with the same rows as the first input ({rows})",
                               "wrong_shape")  # fmt: skip
        return np.column_stack([given[name].values.reshape(-1) for name in names])

    def located(self, exc: RequestValidationError, spec: FeatureSpec) -> RequestValidationError:
        """The gateway's faults of one value (located by row and column of the matrix, or by
        entity) placed where the value was in this request: ``inputs[k].data[row][column]``
        of the one input, the feature's own input ``inputs[k].data[row]``, or the entity ids'
        input ``inputs[k].data[row]``."""
        index = {t.name: i for i, t in enumerate(self.inputs)}
        columns = spec.caller_names if spec.lookup is not None else spec.names
        faults = []
        for fault in exc.errors():
            loc = tuple(fault.get("loc") or ())
            if loc[:1] == ("body",):
                loc = loc[1:]
            if len(loc) == 2 and all(isinstance(part, int) for part in loc):
                row, column = loc
                if INPUT in index:
                    fault = {**fault, "loc": ("inputs", index[INPUT], "data", row, column)}
                else:
                    fault = {**fault, "loc": ("inputs", index[columns[column]], "data", row)}
            elif loc == () and fault.get("type") in ("too_long", "wrong_shape"):
                # the matrix's row count or shape: the input that gave it
                fault = {**fault, "loc": ("inputs", index.get(INPUT, 0), "shape")}
            elif (
                spec.lookup is not None
                and spec.lookup.key in index
                and loc[:1] in (("entity",), ("entities",))
            ):
                row = loc[1] if len(loc) > 1 else 0
                fault = {**fault, "loc": ("inputs", index[spec.lookup.key], "data", row)}
            faults.append(fault)
        return RequestValidationError(faults)


@dataclass(frozen=True, slots=True)
class Bounds:
    """The most one deployment's request may hold, checked before its values are decoded: a
    megabyte of ``[[0],[0],...]``, of 17,000 inputs or of 262,144 binary BYTES elements held
    a gateway process's event loop 0.3-0.5 s before the row bound refused it (found by a
    helper's fuzzing; ``/v1`` predict has the same guard, ``validation.parse_body``)."""

    inputs: int
    """Inputs: one per feature and the lookup key (``input`` alone is fewer)."""
    rows: int
    marks: int
    """``[`` and ``{`` a valid request may carry in names and its id, beyond its structure."""

    @classmethod
    def of(cls, spec: FeatureSpec, max_rows: int) -> Bounds:
        names = [*spec.names, spec.lookup.key if spec.lookup is not None else ""]
        marks = sum(name.count("[") + name.count("{") for name in names) + MAX_ID_CHARS
        return cls(len(spec.names) + 1, max_rows, marks)

    def check_text(self, header: bytes) -> None:
        """Before parsing: every array and object a valid request may open (the inputs, each
        with its shape, nested data and parameters, the outputs), and some room to spare."""
        arrays, objects = header.count(b"["), header.count(b"{")
        most_arrays = 2 + self.inputs * (self.rows + 2) + self.marks + 64
        most_objects = 4 + 2 * (self.inputs + len(OUTPUTS)) + self.marks + 64
        if arrays > most_arrays or objects > most_objects:
            raise _invalid(("inputs",), f"the request opens {arrays} arrays and {objects} "
                           f"objects: it holds at most {self.inputs} inputs of at most "
                           f"{self.rows} rows each", "too_long")  # fmt: skip

    def check(self, doc: InferenceRequest) -> None:
        """After parsing, before any value is decoded: inputs, and rows of each."""
        if len(doc.inputs) > self.inputs:
            raise _invalid(("inputs",), f"{len(doc.inputs)} inputs: the model takes at most "
                           f"{self.inputs} ({INPUT!r}, or one per feature)",
                           "too_long")  # fmt: skip
        for i, item in enumerate(doc.inputs):
            if item.shape and item.shape[0] > self.rows:
                raise _invalid(("inputs", i, "shape"), f"{item.shape[0]} rows, 1 to "
                               f"{self.rows} per request", "too_long")  # fmt: skip
            if math.prod(item.shape) > self.rows * self.inputs:
                raise _invalid(("inputs", i, "shape"), f"shape {list(item.shape)[:8]}: more "
                               f"values than {self.rows} rows of {self.inputs - 1} features",
                               "too_long")  # fmt: skip


def parse_infer(
    body: bytes,
    header_length: str | None,
    model_outputs: Sequence[str] = OUTPUTS,
    bounds: Bounds | None = None,
) -> InferRequest:
    """The request in ``body`` (JSON, or JSON then binary tensor data when
    ``header_length``, the ``Inference-Header-Content-Length`` header, is given), or
    RequestValidationError naming what is wrong; within ``bounds`` when given."""
    header, tail = _split(body, header_length)
    if bounds is not None:
        bounds.check_text(header)
    try:
        doc = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        faults = [_fault(e["loc"], e["msg"], e["type"]) for e in exc.errors(include_url=False)]
        if header_length is None and "trailing characters" in faults[0]["msg"]:
            faults[0]["msg"] += (
                " (a body with binary tensor data needs the Inference-Header-Content-Length header)"
            )
        elif (fault := encoding_fault(header)) is not None and (
            header_length is None or fault[0] != "missing"  # an empty JSON part: said below
        ):  # none, a mark, UTF-16: as on /v1
            faults = [_fault((), fault[1], fault[0])]
        elif header_length is not None and faults[0]["type"] == "json_invalid":
            faults[0]["msg"] += (
                f" in the body's first {len(header)} bytes, the JSON part by its "
                "Inference-Header-Content-Length header"
            )
        raise RequestValidationError(faults) from None
    if doc.id and not is_request_id(doc.id):
        raise _invalid(("id",), f"id must be 1-{MAX_ID_CHARS} printable ASCII characters, "
                                "no space at either end (as X-Request-Id)")  # fmt: skip
    if bounds is not None:
        bounds.check(doc)
    inputs: list[Tensor] = []
    offset = 0
    seen: set[str] = set()
    for i, item in enumerate(doc.inputs):
        if item.name in seen:
            raise _invalid(("inputs", i, "name"), f"input {item.name!r} is given twice")
        seen.add(item.name)
        tensor, used = _tensor(i, item, tail, offset, header_length is not None)
        inputs.append(tensor)
        offset += used
    if offset != len(tail):
        raise _invalid((), f"the binary part of the body has {len(tail)} bytes, the inputs' "
                           f"binary_data_size add up to {offset}", "binary_size")  # fmt: skip
    # an empty id counts as none, as an empty X-Request-Id does
    return InferRequest(doc.id or None, tuple(inputs), _outputs(doc, model_outputs))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    # Bounded before int(): Python refuses more than 4,300 digits (a 500 with a traceback).
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or int(text) > len(body):
        raise RequestValidationError([{
            "type": "value_error", "loc": ("header", HEADER_LENGTH),
            "msg": f"Inference-Header-Content-Length must be a whole number of bytes, at most "
                   f"the body's {len(body)}; got {header_length[:40]!r}",
        }])  # fmt: skip
    end = int(text)
    return body[:end], body[end:]


def _tensor(
    i: int, item: RequestInput, tail: bytes, offset: int, binary_allowed: bool
) -> tuple[Tensor, int]:
    """One input's tensor and the binary bytes it took."""
    at: tuple[str | int, ...] = ("inputs", i)
    dtype = DTYPES.get(item.datatype)
    if dtype is None and item.datatype != BYTES:
        raise _invalid((*at, "datatype"), f"input {item.name!r} has datatype "
                       f"{item.datatype[:20]!r}: FP32, FP64, INT64 or INT32 is taken (BYTES "
                       "for entity ids)",
                       "datatype")  # fmt: skip
    shape = tuple(item.shape)
    if math.prod(d for d in shape if d) > MAX_VALUES:  # numpy refuses such a shape even empty
        dims = "dimensions other than 0" if 0 in shape else "dimensions"
        raise _invalid((*at, "shape"), f"shape {list(shape)[:8]}: its {dims} multiply past "
                       f"{MAX_VALUES}, more values than an input may hold", "too_long")  # fmt: skip
    count = math.prod(shape)
    size = (item.parameters or {}).get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise _invalid((*at, "parameters", "binary_data_size"),
                           "binary_data_size must be a whole number of bytes")  # fmt: skip
        if not binary_allowed:
            raise _invalid((*at, "parameters", "binary_data_size"), "binary_data_size needs the "
                           "Inference-Header-Content-Length header", "binary_size")  # fmt: skip
        if item.data is not None:
            raise _invalid((*at, "data"), "an input has data or binary_data_size, not both")
        if dtype is not None and size != count * dtype.itemsize:
            raise _invalid((*at, "parameters", "binary_data_size"), f"binary_data_size is "
                           f"{size}, shape {list(shape)} of {item.datatype} takes "
                           f"{count * dtype.itemsize} bytes", "binary_size")  # fmt: skip
        if offset + size > len(tail):
            raise _invalid((*at, "parameters", "binary_data_size"), f"input {item.name!r} "
                           f"needs {size} bytes at byte {offset} of the binary part, which "
                           f"has {len(tail)}", "binary_size")  # fmt: skip
        if dtype is None:
            texts = np.array(_binary_strings(tail[offset : offset + size], count, at), object)
            return Tensor(item.name, shape, texts.reshape(shape), BYTES), size
        values = np.frombuffer(tail, dtype, count, offset).reshape(shape)
        return Tensor(item.name, shape, values, item.datatype), size
    if item.data is None:
        raise _invalid((*at, "data"), f"input {item.name!r} has neither data nor "
                       "binary_data_size", "missing")  # fmt: skip
    if dtype is None:
        flat = _flat(item.data, shape, (*at, "data"), (str,), "strings")
        return Tensor(item.name, shape, np.array(flat, dtype=object).reshape(shape), BYTES), 0
    flat = _flat(item.data, shape, (*at, "data"), (int, float), "numbers")
    try:
        values = np.array(flat, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise _invalid((*at, "data"), "a value is out of range", "out_of_range") from None
    return Tensor(item.name, shape, _as_declared(values, flat, item.datatype, at), item.datatype), 0


INT32_BOUND = 2**31
"""A JSON value of an INT32 input is below this and at least its negative, as the binary form
of the same tensor holds."""


def _as_declared(
    values: np.ndarray, flat: list[Any], datatype: str, at: tuple[str | int, ...]
) -> np.ndarray:
    """JSON ``values`` as their declared datatype holds them: FP32 rounded to float32 (past its
    range, infinite: refused later, naming the feature), INT32 within its range, else a 422
    naming the first value beyond it. An INT32 input of 2**40 was taken, and an FP32 one fed a
    float64 model double precision that the same tensor sent binary cannot carry (a helper's
    fuzzing); Triton holds JSON data to its declared datatype the same way."""
    if datatype == "FP32":
        with np.errstate(over="ignore"):
            return values.astype(np.float32)
    if datatype != "INT32":
        return values
    outside = np.flatnonzero((values < -INT32_BOUND) | (values >= INT32_BOUND))
    if outside.size:
        k = int(outside[0])
        where = tuple(int(j) for j in np.unravel_index(k, values.shape))
        raise _invalid((*at, "data", *where), f"{flat[k]!r} is beyond what INT32 holds",
                       "out_of_range")  # fmt: skip
    return values


def _binary_strings(blob: bytes, count: int, at: tuple[str | int, ...]) -> list[str]:
    """``count`` BYTES elements: each a 4-byte little-endian length, then that many bytes of
    UTF-8."""
    texts: list[str] = []
    pos = 0
    for k in range(count):
        size = int.from_bytes(blob[pos : pos + 4], "little") if pos + 4 <= len(blob) else None
        if size is None or pos + 4 + size > len(blob):
            raise _invalid((*at, "parameters", "binary_data_size"), f"BYTES element {k} runs "
                           f"past the input's {len(blob)} bytes", "binary_size")  # fmt: skip
        try:
            texts.append(blob[pos + 4 : pos + 4 + size].decode())
        except UnicodeDecodeError:
            raise _invalid((*at, "data", k), "not UTF-8", "utf8") from None
        pos += 4 + size
    if pos != len(blob):
        raise _invalid((*at, "parameters", "binary_data_size"), f"{count} BYTES elements "
                       f"take {pos} bytes, binary_data_size says {len(blob)}",
                       "binary_size")  # fmt: skip
    return texts


def _flat(
    data: Any, shape: tuple[int, ...], at: tuple[str | int, ...], kinds: tuple[type, ...],
    what: str,
) -> list[Any]:  # fmt: skip
    """The values of ``data`` (of ``kinds``), given flat (row-major) or nested as ``shape``."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise _invalid(at, f"data must be an array of {what}")
    flat: list[Any] = data
    nested = len(shape) > 1 and bool(data) and isinstance(data[0], list)
    if nested:
        level: list[Any] = [data]
        for size in shape:
            deeper: list[Any] = []
            for node in level:
                if not isinstance(node, list) or len(node) != size:
                    raise _invalid(at, f"data is nested otherwise than its shape "
                                       f"{list(shape)}", "shape_mismatch")  # fmt: skip
                deeper.extend(node)
            level = deeper
        flat = level
    elif len(flat) != count:
        raise _invalid(at, f"{len(flat)} values for shape {list(shape)}, which holds {count}",
                       "shape_mismatch")  # fmt: skip
    if not set(map(type, flat)) <= set(kinds):
        k = next(k for k, v in enumerate(flat) if type(v) not in kinds)
        where = tuple(int(j) for j in np.unravel_index(k, shape)) if nested else (k,)
        given = _json_kind(flat[k])
        raise _invalid((*at, *where), f"data must hold {what} only; this is {given}",
                       "float_type" if what == "numbers" else "string_type")  # fmt: skip
    return flat


def _json_kind(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object",
             list: "an array", int: "a number", float: "a number"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


def _outputs(doc: InferenceRequest, model_outputs: Sequence[str]) -> tuple[tuple[str, bool], ...]:
    binary_all = (doc.parameters or {}).get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise _invalid(("parameters", "binary_data_output"), "binary_data_output must be a bool")
    if not doc.outputs:
        return tuple((name, binary_all) for name in model_outputs)
    chosen: list[tuple[str, bool]] = []
    for i, out in enumerate(doc.outputs):
        at: tuple[str | int, ...] = ("outputs", i)
        if out.name not in model_outputs:
            raise _invalid((*at, "name"), f"unknown output {out.name!r}: the model has "
                           f"{', '.join(map(repr, model_outputs))}", "unknown_output")  # fmt: skip
        if any(out.name == name for name, _ in chosen):
            raise _invalid((*at, "name"), f"output {out.name!r} is asked for twice")
        params = out.parameters or {}
        if "classification" in params:
            raise _invalid((*at, "parameters", "classification"),
                           "the classification extension is not supported")  # fmt: skip
        binary = params.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise _invalid((*at, "parameters", "binary_data"), "binary_data must be a bool")
        chosen.append((out.name, binary))
    return tuple(chosen)


__all__ = ["Bounds", "InferRequest", "Tensor", "parse_infer"]
