"""The Open Inference Protocol v2's wire format (KServe v2, what Triton and MLServer speak),
without a server: the JSON part of an inference request (``InferenceRequest``), its tensors
read into an ``InferRequest`` (``parse_infer``) whose ``matrix`` is the deployment's feature
matrix, and the service's answer shaped as OIP outputs (``encode_answer``): ``label`` (INT64,
one per row) and ``probabilities`` (FP32, rows x classes, in the model's class order).

The binary tensor data extension is spoken both ways, as ``tritonclient.http`` uses it by
default: a body whose ``Inference-Header-Content-Length`` header says how long its JSON part
is, followed by each binary input's little-endian bytes in input order (``binary_data_size``
in the input's ``parameters``); outputs are sent the same way when asked for
(``binary_data`` on a requested output, or ``binary_data_output`` on the request).

It does no I/O and builds no response: a refusal is FastAPI's ``RequestValidationError``, as
the data plane's own validation raises it, which the service counts and ``problem_of`` makes a
422. It is one protocol's wire format, so it lives with the transport that speaks it (the
routes in ``gateway.transport.oip``); the data plane takes any protocol's ``Decoder``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from rendezvous.spec import FeatureSpec

INPUT = "input"
"""The one input of every model: FP32 (or FP64) [rows, features], columns in the deployment's
feature-spec order. One input per feature, named as in the spec, is taken too."""
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
HEADER_LENGTH = "inference-header-content-length"
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
"""Input datatypes taken, as little-endian numpy types (the binary extension's byte order)."""
MAX_ID_CHARS = 128
"""An ``id`` becomes the request id: limited as ``X-Request-Id`` is."""


# -- the request ---------------------------------------------------------------------------


MAX_VALUES = 2**31
"""Most values a shape may describe (its zero dimensions aside): far past any request the
row bound lets through, and short of what numpy refuses to shape."""


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(max_length=8)
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Any = None
    """Numbers, flat in row-major order or nested as the shape; absent for a binary input."""


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The JSON part of an inference request (``$inference_request``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": INPUT, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
                    ],
                }
            ]
        },
    )

    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def _fault(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


def _invalid(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> Exception:
    return RequestValidationError([_fault(loc, msg, kind)])


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    values: np.ndarray
    """float64 or float32, already in ``shape``."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    """An inference request, checked as far as it can be without the deployment's spec."""

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, bool], ...]
    """(name, binary) of each output to answer, in answer order."""

    def matrix(self, spec: FeatureSpec) -> np.ndarray:
        """The rows x ``spec.width`` matrix (float64 or float32; ``check_matrix`` makes it the
        finite float32 the models take), or RequestValidationError."""
        if any(t.name == INPUT for t in self.inputs):
            if len(self.inputs) > 1:
                raise _invalid(("inputs",), f"send one input {INPUT!r} or one input per "
                                            "feature, not both")  # fmt: skip
            [tensor] = self.inputs
            if len(tensor.shape) != 2 or tensor.shape[1] != spec.width:
                raise _invalid(("inputs", 0, "shape"), f"input {INPUT!r} has shape "
                               f"{list(tensor.shape)}: the model takes [rows, {spec.width}]",
                               "wrong_shape")  # fmt: skip
            return tensor.values
        known = set(spec.names)
        faults = [
            _fault(
                ("inputs", i, "name"),
                f"unknown input {t.name!r}: the model takes "
                f"{INPUT!r} [rows, {spec.width}], or one input per feature named as in its "
                "feature spec",
                "unknown_input",
            )
            for i, t in enumerate(self.inputs)
            if t.name not in known
        ]
        given = {t.name: t for t in self.inputs}
        faults += [
            _fault(("inputs",), f"missing input for feature {name!r}", "missing")
            for name in spec.names
            if name not in given
        ]
        if faults:
            raise RequestValidationError(faults)
        rows = self.inputs[0].shape[0] if self.inputs[0].shape else 0
        for i, t in enumerate(self.inputs):
            if t.shape not in ((rows,), (rows, 1)):
                raise _invalid(("inputs", i, "shape"), f"input {t.name!r} has shape "
                               f"{list(t.shape)}: a feature's input is [rows] or [rows, 1] "
                               f"with the same rows as the first input ({rows})",
                               "wrong_shape")  # fmt: skip
        return np.column_stack([given[name].values.reshape(-1) for name in spec.names])

    def located(self, exc: RequestValidationError, spec: FeatureSpec) -> RequestValidationError:
        """The gateway's faults of one value (located by row and column of the matrix) placed
        where the value was in this request: ``inputs[0].data[row][column]``, or the feature's
        own input, ``inputs[k].data[row]``."""
        faults = []
        for fault in exc.errors():
            loc = tuple(fault.get("loc") or ())
            if loc[:1] == ("body",):
                loc = loc[1:]
            if len(loc) == 2 and all(isinstance(part, int) for part in loc):
                row, column = loc
                if any(t.name == INPUT for t in self.inputs):
                    fault = {**fault, "loc": ("inputs", 0, "data", row, column)}
                else:
                    name = spec.names[column]
                    k = next(i for i, t in enumerate(self.inputs) if t.name == name)
                    fault = {**fault, "loc": ("inputs", k, "data", row)}
            faults.append(fault)
        return RequestValidationError(faults)


def parse_infer(
    body: bytes, header_length: str | None, model_outputs: Sequence[str] = OUTPUTS
) -> InferRequest:
    """The request in ``body`` (JSON, or JSON then binary tensor data when
    ``header_length``, the ``Inference-Header-Content-Length`` header, is given), or
    RequestValidationError naming what is wrong."""
    header, tail = _split(body, header_length)
    try:
        doc = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        faults = [_fault(e["loc"], e["msg"], e["type"]) for e in exc.errors(include_url=False)]
        if header_length is None and "trailing characters" in faults[0]["msg"]:
            faults[0]["msg"] += (
                " (a body with binary tensor data needs the Inference-Header-Content-Length header)"
            )
        elif header_length is not None and faults[0]["type"] == "json_invalid":
            faults[0]["msg"] += (
                f" in the body's first {len(header)} bytes, the JSON part by its "
                "Inference-Header-Content-Length header"
            )
        raise RequestValidationError(faults) from None
    if doc.id and not (len(doc.id) <= MAX_ID_CHARS and doc.id.isprintable()):
        raise _invalid(("id",), f"id must be 1-{MAX_ID_CHARS} printable characters")
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
    if not (text.isascii() and text.isdigit()) or int(text) > len(body):
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
    if dtype is None:
        raise _invalid((*at, "datatype"), f"input {item.name!r} has datatype "
                       f"{item.datatype[:20]!r}: FP32 or FP64 is taken", "datatype")  # fmt: skip
    shape = tuple(item.shape)
    if math.prod(d for d in shape if d) > MAX_VALUES:  # numpy refuses such a shape even empty
        raise _invalid((*at, "shape"), f"shape {list(shape)[:8]} would hold more than "
                       f"{MAX_VALUES} values", "too_long")  # fmt: skip
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
        if size != count * dtype.itemsize:
            raise _invalid((*at, "parameters", "binary_data_size"), f"binary_data_size is "
                           f"{size}, shape {list(shape)} of {item.datatype} takes "
                           f"{count * dtype.itemsize} bytes", "binary_size")  # fmt: skip
        if offset + size > len(tail):
            raise _invalid((*at, "parameters", "binary_data_size"), f"input {item.name!r} "
                           f"needs {size} bytes at byte {offset} of the binary part, which "
                           f"has {len(tail)}", "binary_size")  # fmt: skip
        values = np.frombuffer(tail, dtype, count, offset).reshape(shape)
        return Tensor(item.name, shape, values), size
    if item.data is None:
        raise _invalid((*at, "data"), f"input {item.name!r} has neither data nor "
                       "binary_data_size", "missing")  # fmt: skip
    flat = _flat(item.data, shape, (*at, "data"))
    try:
        values = np.array(flat, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise _invalid((*at, "data"), "a value is out of range", "out_of_range") from None
    return Tensor(item.name, shape, values), 0


def _flat(data: Any, shape: tuple[int, ...], at: tuple[str | int, ...]) -> list[Any]:
    """The numbers of ``data``, given flat (row-major) or nested as ``shape``."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise _invalid(at, "data must be an array of numbers")
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
    if not set(map(type, flat)) <= {int, float}:
        k = next(k for k, v in enumerate(flat) if type(v) not in (int, float))
        where = tuple(int(j) for j in np.unravel_index(k, shape)) if nested else (k,)
        given = _json_kind(flat[k])
        raise _invalid((*at, *where), f"data must hold numbers only; this is {given}",
                       "float_type")  # fmt: skip
    return flat


def _json_kind(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object",
             list: "an array"}  # fmt: skip
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


# -- the answer ----------------------------------------------------------------------------


def encode_answer(
    answer: dict[str, Any], outputs: Sequence[tuple[str, bool]], model: str
) -> tuple[bytes, int | None]:
    """The service's answer as an OIP inference response: the body, and the length of its
    JSON part when binary outputs follow it (None: all JSON). ValueError when the model
    answered a probability that is not finite."""
    predictions = answer["predictions"]
    tensors = {
        LABEL: ("INT64", np.array([p["label"] for p in predictions], dtype="<i8")),
        PROBABILITIES: (
            "FP32",
            np.array([list(p["probabilities"].values()) for p in predictions], dtype="<f4"),
        ),
    }
    if not np.isfinite(tensors[PROBABILITIES][1]).all():
        raise ValueError("non-finite probability")
    found = answer["model"]
    docs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs:
        datatype, array = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.reshape(-1).tolist()
        docs.append(out)
    doc = {
        "model_name": model,
        "model_version": str(found["version"]),
        "id": answer["request_id"],
        "parameters": {
            "role": found["role"],
            "model": found["name"],
            "latency_ms": answer["latency_ms"],
        },
        "outputs": docs,
    }
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


__all__ = [
    "DTYPES",
    "HEADER_LENGTH",
    "INPUT",
    "LABEL",
    "OUTPUTS",
    "PROBABILITIES",
    "InferRequest",
    "InferenceRequest",
    "Tensor",
    "encode_answer",
    "parse_infer",
]
