"""Open Inference Protocol v2 over REST (KServe v2, what Triton and MLServer speak): every
deployment is a model.

The routes are thin: infer parses the request (``parse_infer``), hands
``PredictionService.predict`` a decoder that turns it into the deployment's float32 matrix
(``InferRequest.matrix``), so the request travels the same rendezvous path as a ``/v1``
predict (every bin scores it, the log bin archives the body as sent, a decision record is
written), and shapes the service's answer as OIP outputs (``encode_answer``): ``label`` (INT64,
one per row) and ``probabilities`` (FP32, rows x classes, in the model's class order).

The binary tensor data extension is spoken both ways, as ``tritonclient.http`` uses it by
default: a body whose ``Inference-Header-Content-Length`` header says how long its JSON part
is, followed by each binary input's little-endian bytes in input order (``binary_data_size``
in the input's ``parameters``); outputs are sent the same way when asked for
(``binary_data`` on a requested output, or ``binary_data_output`` on the request).

Every refusal is ``{"error": "..."}`` (``gateway.problems.Style.ERROR``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import UnknownDeployment, problem_of
from gateway.dataplane.service import PredictionService
from gateway.problems import RETRY, Problem, Style
from gateway.settings import Settings
from models.deployments import Deployment, ModelRef
from models.registry import ModelRegistry
from rendezvous import names
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

PREFIX = "/v2"
SERVER_NAME = "rendezvous-gateway"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime"
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


class UnknownVersion(UnknownDeployment):
    """The path names a version that holds no role of the deployment (404)."""


# -- the request ---------------------------------------------------------------------------


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
        raise RequestValidationError(faults) from None
    if doc.id is not None and not (1 <= len(doc.id) <= MAX_ID_CHARS and doc.id.isprintable()):
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
    return InferRequest(doc.id, tuple(inputs), _outputs(doc, model_outputs))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or int(text) > len(body):
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
    if len(shape) > 1 and data and isinstance(data[0], list):
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
        raise _invalid(at, "data must hold numbers only", "float_type")
    return flat


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


def _fault_text(detail: Any) -> str:
    """A 422's list of faults as one line: ``inputs[0].datatype: ...; ...``."""
    if isinstance(detail, str):
        return detail
    parts = []
    for fault in detail if isinstance(detail, list) else [detail]:
        if not isinstance(fault, dict):
            parts.append(str(fault))
            continue
        loc = list(fault.get("loc") or ())
        if loc[:1] == ["body"]:
            loc = loc[1:]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        parts.append(f"{path}: {fault.get('msg')}" if path else str(fault.get("msg")))
    return "; ".join(parts)


def error(problem: Problem) -> JSONResponse:
    if not isinstance(problem.detail, str):
        problem = dataclasses.replace(problem, detail=_fault_text(problem.detail))
    return problem.response(Style.ERROR)


def _failure(exc: Exception, what: str) -> JSONResponse:
    problem = problem_of(exc)
    if problem is None:
        log.exception("%s failed", what)
        problem = Problem(500, "internal server error")
    return error(problem)


# -- metadata ------------------------------------------------------------------------------


def versions(dep: Deployment) -> list[str]:
    """The versions that hold a role, real's first."""
    found: list[str] = []
    for role in dep.role_names:
        version = str(dep.roles[role].version)
        if version not in found:
            found.append(version)
    return found


def roles_of(dep: Deployment, version: str) -> list[str]:
    return [r for r in dep.role_names if str(dep.roles[r].version) == version]


def _deployment(deployments: DeploymentCache, model: str, version: str | None) -> Deployment:
    dep = deployments.get(model)
    if version is not None and not roles_of(dep, version):
        raise UnknownVersion(
            f"model {model!r} has no version {version!r} in a role (versions: "
            f"{', '.join(versions(dep))})"
        )
    return dep


def model_metadata(dep: Deployment, classes: int | None) -> dict[str, Any]:
    return {
        "name": dep.name,
        "versions": versions(dep),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, dep.feature_spec.width]}],
        "outputs": [
            {"name": LABEL, "datatype": "INT64", "shape": [-1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes or -1]},
        ],
    }


async def _class_count(request: Request, ref: ModelRef, models_dir: Path) -> int | None:
    """How many classes the model version answers, from the registry's index in Redis, else
    from this gateway's data folder; None when neither has it."""
    raw = await request.app.state.redis.hget(
        names.MODELS_INDEX, f"{ref.name}:{ref.version}"
    )  # same field as the registry's
    if raw is not None:
        return len(json.loads(raw)["classes"])

    def from_disk() -> int | None:
        try:
            return len(ModelRegistry(models_dir).meta(ref.name, ref.version).classes)
        except (OSError, LookupError, ValueError):
            return None

    return await asyncio.to_thread(from_disk)


# -- the routes ----------------------------------------------------------------------------


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model, or a version that holds no role"},
    413: {"description": "body too large"},
    415: {"description": "a compressed body"},
    422: {"description": "invalid input; the error names each field at fault"},
    429: {"description": "this gateway is at its in-flight bound"},
    503: {"description": "Redis unavailable or the input stream is backlogged"},
    504: {"description": "no model answered within the deployment's timeout"},
}


def _inlined(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with its ``$defs`` references replaced by what they name (in an OpenAPI
    document ``#/...`` points at the document's root, not at the schema's)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inlined(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inlined(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inlined(v, defs) for v in node]
    return node


_REQUEST_SCHEMA = InferenceRequest.model_json_schema()
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _inlined(_REQUEST_SCHEMA, _REQUEST_SCHEMA.get("$defs", {}))
            }
        },
    }
}


def mount(app: FastAPI, settings: Settings) -> None:
    """Add the ``/v2`` routes to ``app``."""
    router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])

    @router.get("/health/live")
    async def server_live() -> dict[str, bool]:
        """The process is alive (as ``/healthz``)."""
        return {"live": True}

    @router.get("/health/ready")
    async def server_ready(request: Request) -> JSONResponse:
        """200 exactly when ``/readyz`` is 200: it asks ``/readyz`` itself, in process."""
        import httpx  # here: a probe's import once, not ~5 MB in every gateway process

        transport = httpx.ASGITransport(app=request.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            readyz = await client.get("/readyz")
        retry = readyz.headers.get("retry-after")
        return JSONResponse(
            {"ready": readyz.status_code == 200},
            status_code=readyz.status_code,
            headers={"Retry-After": retry} if retry else None,
        )

    @router.get("")
    async def server_metadata(request: Request) -> dict[str, Any]:
        """Server name, version and extensions."""
        return {"name": SERVER_NAME, "version": request.app.version,
                "extensions": list(EXTENSIONS)}  # fmt: skip

    async def metadata(request: Request, model: str, version: str | None) -> JSONResponse:
        try:
            dep = _deployment(request.app.state.deployments, model, version)
            role = roles_of(dep, version)[0] if version is not None else names.REAL
            classes = await _class_count(request, dep.roles[role], settings.models_dir)
        except Exception as exc:
            return _failure(exc, f"metadata of {model}")
        return JSONResponse(model_metadata(dep, classes))

    @router.get("/models/{model}", responses={404: {"description": "unknown model"}})
    async def model_meta(model: str, request: Request) -> JSONResponse:
        """The model's metadata: versions that hold a role, its input and outputs."""
        return await metadata(request, model, None)

    @router.get(
        "/models/{model}/versions/{version}",
        responses={404: {"description": "unknown model, or a version that holds no role"}},
    )
    async def version_meta(model: str, version: str, request: Request) -> JSONResponse:
        """The metadata of a version that holds a role (its classes in ``probabilities``)."""
        return await metadata(request, model, version)

    async def model_ready(request: Request, model: str, version: str | None) -> JSONResponse:
        try:
            dep = _deployment(request.app.state.deployments, model, version)
            wanted = roles_of(dep, version) if version is not None else [names.REAL]
            live_after = time.time() - settings.heartbeat_timeout_s
            members = await asyncio.wait_for(
                request.app.state.redis.zrangebyscore(
                    names.workers_key(dep.name), live_after, "+inf"
                ),
                timeout=settings.redis_timeout_s,
            )
        except Exception as exc:
            return _failure(exc, f"readiness of {model}")
        live = {m.decode().split("|", 1)[0] for m in members}
        ready = any(role in live for role in wanted)
        doc = {"name": model, "ready": ready}
        return JSONResponse(doc, status_code=200 if ready else 503,
                            headers=None if ready else RETRY)  # fmt: skip

    @router.get("/models/{model}/ready", responses={404: {"description": "unknown model"}})
    async def ready(model: str, request: Request) -> JSONResponse:
        """200 when the model's real role has a live worker, else 503."""
        return await model_ready(request, model, None)

    @router.get(
        "/models/{model}/versions/{version}/ready",
        responses={404: {"description": "unknown model, or a version that holds no role"}},
    )
    async def version_ready(model: str, version: str, request: Request) -> JSONResponse:
        """200 when a role that this version holds has a live worker, else 503."""
        return await model_ready(request, model, version)

    async def infer(
        request: Request,
        model: str,
        version: str | None,
        header_length: str | None,
        x_request_id: str | None,
    ) -> Response:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            return error(Problem(415, f"Content-Encoding {encoding[:20]!r} is not taken: send "
                                      "the body uncompressed"))  # fmt: skip
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone, or refused by the body cap, which has answered
            return Response(status_code=400)
        service: PredictionService = request.app.state.service
        failure: Exception | None = None
        parsed: InferRequest | None = None
        try:
            parsed = parse_infer(raw, header_length)
        except RequestValidationError as exc:
            failure = exc

        def decode(spec: FeatureSpec, body: bytes) -> np.ndarray:
            # In the service, so that every refusal is counted as the service counts one.
            _deployment(service.deployments, model, version)
            if parsed is None:
                assert failure is not None
                raise failure
            return parsed.matrix(spec)

        request_id = parsed.id if parsed is not None and parsed.id else x_request_id
        try:
            answer = await service.predict(model, raw, request_id, decode=decode)
        except Exception as exc:
            return _failure(exc, f"infer {model}")
        assert parsed is not None  # else decode raised
        try:
            body, json_length = encode_answer(answer, parsed.outputs, model)
        except ValueError:
            found = answer["model"]
            return error(
                Problem(
                    502,
                    f"model {found['name']} v{found['version']} "
                    f"({found['role']}) answered a non-finite probability",
                )
            )
        if json_length is None:
            return Response(body, media_type="application/json")
        return Response(body, headers={"Inference-Header-Content-Length": str(json_length)},
                        media_type="application/octet-stream")  # fmt: skip

    @router.post("/models/{model}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
    async def model_infer(
        model: str,
        request: Request,
        inference_header_content_length: Annotated[str | None, Header()] = None,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Score the inputs with the model's real version (or the schedule's fallback): every
        role scores them; ``model_version`` and ``parameters.role`` say which answered."""
        return await infer(request, model, None, inference_header_content_length, x_request_id)

    @router.post(
        "/models/{model}/versions/{version}/infer",
        responses=INFER_RESPONSES,
        openapi_extra=INFER_BODY,
    )
    async def version_infer(
        model: str,
        version: str,
        request: Request,
        inference_header_content_length: Annotated[str | None, Header()] = None,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """As the model's infer, for a version that holds a role (404 otherwise). The
        schedule still picks the answer: ``model_version`` and ``parameters.role`` say which
        version and role gave it."""
        return await infer(request, model, version, inference_header_content_length, x_request_id)

    app.include_router(router)


__all__ = [
    "InferRequest",
    "InferenceRequest",
    "UnknownVersion",
    "encode_answer",
    "model_metadata",
    "mount",
    "parse_infer",
]
