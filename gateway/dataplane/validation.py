"""Predict-request validation against a deployment's feature spec, and preprocessing into the
model-ready float32 matrix. Every problem becomes a 422 that names the field at fault."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rendezvous.spec import FeatureSpec

_FLOAT32_MAX = float(np.finfo(np.float32).max)

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A JSON number: not a string, not a bool, not NaN or infinity."""


class PredictRequest(BaseModel):
    """Exactly one of ``features`` (one row, by name) or ``instances`` (rows, in spec order)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"features": {"mean radius": 14.1, "mean texture": 19.3}}],
        },
    )

    features: dict[str, FiniteNumber] | None = None
    instances: list[list[FiniteNumber]] | None = Field(default=None, min_length=1)


def parse_body(raw: bytes) -> PredictRequest:
    """Parse and type-check the JSON body in one pass (pydantic-core; nesting depth is capped
    by its parser, so a hostile deeply nested body is a 422, not a RecursionError)."""
    try:
        return PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            msg = f"the body is not UTF-8: {bad.reason} at byte {bad.start}"
            raise RequestValidationError([_error((), msg, "utf8")]) from None
        raise RequestValidationError([_located(e) for e in exc.errors(include_url=False)]) from None


def _located(error: Any) -> dict[str, Any]:
    """A parser error under ``body``; a body that is not JSON at all is not echoed back."""
    located = {**error, "loc": ("body", *error["loc"])}
    if error["type"] == "json_invalid":
        located.pop("input", None)
    return located


def _error(loc: tuple[str | int, ...], msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


def to_matrix(spec: FeatureSpec, request: PredictRequest, max_rows: int) -> np.ndarray:
    """The model's input for this request, or RequestValidationError naming every problem."""
    if (request.features is None) == (request.instances is None):
        raise RequestValidationError(
            [_error((), "send exactly one of 'features' or 'instances'", "value_error")]
        )
    errors: list[dict[str, Any]] = []
    if request.features is not None:
        given = request.features
        for name in spec.names:
            if name not in given:
                errors.append(_error(("features", name), f"missing feature {name!r}", "missing"))
        known = set(spec.names)
        for name in given:
            if name not in known:
                errors.append(
                    _error(("features", name), f"unknown feature {name!r}", "extra_forbidden")
                )
        if errors:
            raise RequestValidationError(errors)
        rows = [[given[name] for name in spec.names]]
    else:
        assert request.instances is not None
        rows = request.instances
        if len(rows) > max_rows:
            raise RequestValidationError(
                [
                    _error(
                        ("instances",),
                        f"{len(rows)} instances, at most {max_rows} per request",
                        "too_long",
                    )
                ]
            )
        for i, row in enumerate(rows):
            if len(row) != spec.width:
                errors.append(
                    _error(
                        ("instances", i),
                        f"row has {len(row)} values, the deployment expects {spec.width}",
                        "wrong_length",
                    )
                )
        if errors:
            raise RequestValidationError(errors)
    x64 = np.asarray(rows, dtype=np.float64)
    too_big = np.abs(x64) > _FLOAT32_MAX
    if too_big.any():
        for r, c in zip(*np.nonzero(too_big), strict=True):
            loc: tuple[str | int, ...] = (
                ("features", spec.names[c]) if request.features is not None else
                ("instances", int(r), int(c))
            )  # fmt: skip
            errors.append(_error(loc, "value out of float32 range", "out_of_range", x64[r, c]))
            if len(errors) >= 20:
                break
        raise RequestValidationError(errors)
    x = x64.astype(np.float32)
    return x


def check_matrix(spec: FeatureSpec, x: np.ndarray, max_rows: int) -> np.ndarray:
    """What a protocol's own decoder made, held to the same rules as this gateway's JSON: a
    float32 matrix of 1 to ``max_rows`` rows of the spec's width, every value finite."""
    errors: list[dict[str, Any]] = []
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: infinite, refused
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != spec.width:
        errors.append(_error((), f"the input has shape {list(x.shape)}, the deployment expects "
                                 f"[rows, {spec.width}]", "wrong_shape"))  # fmt: skip
    elif not 1 <= x.shape[0] <= max_rows:
        errors.append(_error((), f"{x.shape[0]} rows, 1 to {max_rows} per request", "too_long"))
    elif not np.isfinite(x).all():
        r, c = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
        errors.append(_error((r, c), f"row {r}, {spec.names[c]!r}: not a finite float32 number",
                             "finite_number"))  # fmt: skip
    if errors:
        raise RequestValidationError(errors)
    return x


def check_request_id(value: str) -> str:
    if not 1 <= len(value) <= 128 or not value.isprintable():
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "x-request-id"),
                    "msg": "X-Request-Id must be 1-128 printable characters",
                    "input": value[:130],
                }
            ]
        )
    return value
