"""Open Inference Protocol v2 over REST (KServe v2, what Triton and MLServer speak): every
deployment is a model. These are its ``/v2`` routes (``mount``), how they refuse, and what
the OpenAPI document says of infer.

The routes are thin: infer parses the request (``parse_infer``), hands
``PredictionService.predict`` a decoder that turns it into the deployment's float32 matrix
(``InferRequest.matrix``), so the request travels the same rendezvous path as a ``/v1``
predict (every bin scores it, the log bin archives the body as sent, a decision record is
written), and shapes the service's answer as OIP outputs (``encode_answer``). The wire format,
the binary tensor data extension included, is ``gateway.transport.oip_codec``'s; what a model's
metadata says is ``gateway.transport.oip_metadata``'s.

Every refusal is ``{"error": "..."}`` (``gateway.problems.Style.ERROR``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from gateway.dataplane.failures import InvalidDeploymentName, UnknownDeployment, problem_of
from gateway.dataplane.service import PredictionService
from gateway.dataplane.validation import single_request_id
from gateway.problems import RETRY, Problem, Style, compressed, fault_text
from gateway.settings import Settings
from gateway.transport.fast_path import count_invalid, overload_problem
from gateway.transport.oip_answer import encode_answer
from gateway.transport.oip_codec import Bounds, InferRequest, parse_infer
from gateway.transport.oip_lookup import lookup_rows
from gateway.transport.oip_metadata import (
    class_count,
    deployment_of,
    model_config,
    model_metadata,
)
from gateway.transport.oip_repository import (
    LOAD_REFUSAL,
    IndexRefused,
    IndexRequest,
    index_request,
    live_roles,
    repository_index,
)
from gateway.transport.oip_schema import HEADER_LENGTH, InferenceRequest
from models.deployments import ModelRef
from rendezvous import names
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

PREFIX = "/v2"
SERVER_NAME = "rendezvous-gateway"
EXTENSIONS = ("binary_tensor_data",)


# -- refusals ------------------------------------------------------------------------------


def error(problem: Problem) -> JSONResponse:
    if not isinstance(problem.detail, str):
        problem = dataclasses.replace(problem, detail=fault_text(problem.detail))
    return problem.response(Style.ERROR)


def _failure(exc: Exception, what: str) -> JSONResponse:
    # A name that can never be a deployment's is an unknown model to the protocol (404, as
    # KServe's and Triton's servers answer one), where /v1 and /admin say 422.
    invalid = isinstance(exc, InvalidDeploymentName)
    problem = Problem(404, str(exc)) if invalid else problem_of(exc)
    if problem is None:
        log.exception("%s failed", what)
        problem = Problem(500, "internal server error")
    return error(problem)


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


INDEX_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": IndexRequest.model_json_schema()}},
    }
}


STATISTICS_ELSEWHERE = (
    "the statistics extension is not served: every gateway process counts its requests, by "
    "deployment and outcome, and their durations on GET /metrics (rdv_requests_total, "
    "rdv_request_duration_seconds); the workers' model time by version is "
    "rdv_model_latency_seconds, and their batches rdv_worker_batches_total"
)


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

    for path in ("/models/stats", "/models/{model}/stats", "/models/{model}/versions/{v}/stats"):

        @router.get(path, include_in_schema=False)
        async def statistics() -> JSONResponse:
            """Not kept: a 404 that says where the figures are, not one that reads as an unknown
            model (tritonclient's ``get_inference_statistics``). Before the metadata route, as
            Triton reads ``/v2/models/stats``."""
            return error(Problem(404, STATISTICS_ELSEWHERE))

    async def metadata(
        request: Request, model: str, version: str | None, config: bool = False
    ) -> JSONResponse:
        try:
            dep = deployment_of(request.app.state.deployments, model, version)
            role = dep.roles_holding(version)[0] if version is not None else names.REAL
            classes = await class_count(request, dep.roles[role], settings.models_dir)
        except Exception as exc:
            return _failure(exc, f"{'config' if config else 'metadata'} of {model}")
        doc = model_metadata(dep, classes)
        return JSONResponse(model_config(doc, settings.max_rows) if config else doc)

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

    @router.get("/models/{model}/config", responses={404: {"description": "unknown model"}})
    async def model_conf(model: str, request: Request) -> JSONResponse:
        """The metadata as Triton's model configuration (``max_batch_size``: the row cap)."""
        return await metadata(request, model, None, config=True)

    @router.get(
        "/models/{model}/versions/{version}/config",
        responses={404: {"description": "unknown model, or a version that holds no role"}},
    )
    async def version_conf(model: str, version: str, request: Request) -> JSONResponse:
        """The configuration of a version that holds a role."""
        return await metadata(request, model, version, config=True)

    async def model_ready(request: Request, model: str, version: str | None) -> JSONResponse:
        try:
            dep = deployment_of(request.app.state.deployments, model, version)
            wanted = dep.roles_holding(version) if version is not None else [names.REAL]
            live = await asyncio.wait_for(
                live_roles(request.app.state.redis, dep, settings.heartbeat_timeout_s),
                timeout=settings.redis_timeout_s,
            )
        except Exception as exc:
            return _failure(exc, f"readiness of {model}")
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

    @router.post("/repository/index", responses={400: {"description": "no index request"}},
                 openapi_extra=INDEX_BODY)  # fmt: skip
    async def repository(request: Request) -> Response:
        """Every version that holds a role of a deployment: ``READY`` when one of its roles has
        a live worker, else ``UNAVAILABLE`` with the reason (``{"ready": true}``: the ready
        ones only)."""
        encoded = compressed(request.headers.get("content-encoding", ""))
        if encoded is not None:  # as every body route: it was read as the body's bytes
            return error(encoded)
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone, or refused by the body cap, which has answered
            return Response(status_code=400)
        try:
            asked = index_request(raw)
            index = await asyncio.wait_for(
                repository_index(request.app.state.redis, request.app.state.deployments,
                                 settings.heartbeat_timeout_s, asked.ready),
                timeout=settings.redis_timeout_s,
            )  # fmt: skip
        except IndexRefused as refused:
            return error(refused.problem)
        except Exception as exc:
            return _failure(exc, "the repository index")
        return JSONResponse(index)

    for action in ("load", "unload"):

        @router.post(f"/repository/models/{{model}}/{action}", include_in_schema=False)
        async def load_or_unload(model: str) -> JSONResponse:
            """Refused: the admin API makes, changes and deletes deployments."""
            return error(Problem(400, LOAD_REFUSAL))

    async def infer(
        request: Request,
        model: str,
        version: str | None,
        header_length: str | None,
        x_request_id: str | None,
    ) -> Response:
        service: PredictionService = request.app.state.service
        lengths = request.headers.getlist(HEADER_LENGTH)
        if len(set(lengths)) > 1:  # refused by _split's check, naming both
            header_length = ", ".join(lengths)
        refused = compressed(request.headers.get("content-encoding", ""))
        if refused is not None:
            count_invalid(service, model)
            return error(refused)
        if service.full():  # from the head, as predict's (the body never read)
            return error(overload_problem(service, model))
        try:
            with service.reading_body():
                raw = await request.body()
        except ClientDisconnect:  # gone, or refused by the body cap, which has answered
            return Response(status_code=400)
        failure: Exception | None = None
        parsed: InferRequest | None = None
        known = service.deployments.deployments.get(model)
        # An unknown deployment's body is not parsed: the service answers 404 before any
        # decode (nothing is awaited from here to its look-up).
        try:
            if known is not None:
                bounds = Bounds.of(known.feature_spec, service.max_rows)
                parsed = parse_infer(raw, header_length, bounds=bounds)
        except RequestValidationError as exc:
            failure = exc

        decoded: list[FeatureSpec] = []

        def decode(spec: FeatureSpec, body: bytes) -> tuple[np.ndarray, list[str] | None]:
            nonlocal parsed
            # In the service, so that every refusal is counted as the service counts one.
            dep = deployment_of(service.deployments, model, version)
            if failure is not None:
                raise failure
            if parsed is None:  # known only now (never: see above), parsed within its bounds
                parsed = parse_infer(raw, header_length, bounds=Bounds.of(spec, service.max_rows))
            parsed.refuse_integers(None if dep.input_rule is None else dep.input_rule.integer)
            decoded.append(spec)
            if spec.lookup is not None:
                return lookup_rows(parsed, spec)
            return parsed.matrix(spec), None

        try:
            x_request_id = single_request_id(request.headers.getlist("x-request-id"))
        except RequestValidationError as exc:
            count_invalid(service, model)
            return _failure(exc, f"infer {model}")
        request_id = parsed.id if parsed is not None and parsed.id else x_request_id
        try:
            answer = await service.predict(model, raw, request_id, decode=decode, version=version)
        except RequestValidationError as exc:  # a value's fault: where in this request it was
            located = parsed.located(exc, decoded[0]) if parsed and decoded else exc
            return _failure(located, f"infer {model}")
        except Exception as exc:
            return _failure(exc, f"infer {model}")
        assert parsed is not None  # else decode raised
        found = answer["model"]
        answered = ModelRef(found["name"], found["version"])
        try:
            dep = service.deployments.get(model)
            body, json_length = encode_answer(answer, parsed.outputs, model,
                                              dep.version_name(answered))  # fmt: skip
        except UnknownDeployment:  # deleted as it answered: named as its own model's version
            body, json_length = encode_answer(answer, parsed.outputs, model, str(answered))
        except ValueError:
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
        """As the model's infer, answered by the version named (404 if it holds no role):
        that role alone, up to the timeout (504), without a fallback (502 if it fails); every
        role still scores the inputs. ``parameters.role`` says which role it holds."""
        return await infer(request, model, version, inference_header_content_length, x_request_id)

    app.include_router(router)


__all__ = ["mount"]
