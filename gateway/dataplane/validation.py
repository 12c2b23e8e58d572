"""Predict-request validation against a deployment's feature spec, and preprocessing into the
model-ready float32 matrix. Every problem becomes a 422 that names the field at fault.

For a deployment whose spec looks features up by entity (``FeatureSpec.lookup``),
``enriched_rows`` checks the caller's part and the entity keys, and ``merged`` puts the values
read from the feature store in place (or refuses, naming the entity)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.dataplane.typed_rows import typed_lookups, typed_matrix, typed_rows
from gateway.problems import encoding_fault
from rendezvous.input_types import InputRule
from rendezvous.names import ENTITY_PATTERN
from rendezvous.request_ids import is_request_id
from rendezvous.spec import FeatureSpec, shown_stored, stored_number

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A JSON number: not a string, not a bool, not NaN or infinity."""


class PredictRequest(BaseModel):
    """Exactly one of ``features`` (one row, by name) or ``instances`` (rows, in spec order).

    A deployment that looks features up (enrichment) takes ``entity`` with ``features`` (the
    caller's part, by name), or ``entities`` with ``instances`` (one entity per row, each row
    the caller's part in spec order); the entity alone when every feature is looked up. Other
    deployments refuse both. (The two optional fields cost a plain request nothing measurable
    to parse, about 0.02 us.)"""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"features": {"mean radius": 14.1, "mean texture": 19.3}},
                {"entity": "c-17", "features": {"mean radius": 14.1}},
            ],
        },
    )

    features: dict[str, FiniteNumber] | None = None
    instances: list[list[FiniteNumber]] | None = Field(default=None, min_length=1)
    entity: str | None = None
    entities: list[str] | None = Field(default=None, min_length=1)


def parse_body(raw: bytes, spec: FeatureSpec, max_rows: int) -> PredictRequest:
    """Parse and type-check the JSON body in one pass (pydantic-core; nesting depth is capped
    by its parser, so a hostile deeply nested body is a 422, not a RecursionError). A body
    with more arrays than ``max_rows`` rows can hold is refused before: parsing a megabyte of
    ``[[1],[1],...]`` cost ~110 ms of the event loop before the row cap (found by hand)."""
    arrays = raw.count(b"[")
    entities = 1 if spec.lookup is not None else 0  # the ``entities`` array beside the rows
    if arrays > max_rows + 1 + entities + _brackets_in(spec.names):
        msg = (f"the body opens {arrays} arrays: a request holds at most {max_rows} rows, an "
               "array of numbers each")  # fmt: skip
        raise RequestValidationError([_error(("instances",), msg, "too_long")])
    try:
        return PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        fault = encoding_fault(raw)
        if fault is not None:
            kind, msg = fault  # the body is not echoed back, nor said to be null
            raise RequestValidationError([{"type": kind, "loc": ("body",), "msg": msg}]) from None
        raise RequestValidationError([_located(e) for e in exc.errors(include_url=False)]) from None


@functools.lru_cache(maxsize=256)
def _brackets_in(names: tuple[str, ...]) -> int:
    """Brackets a valid body may hold in its feature names (``{"features": {"x[0]": ...}}``)."""
    return sum(name.count("[") for name in names)


def _located(error: Any) -> dict[str, Any]:
    """A parser error under ``body``; a body that is not JSON at all is not echoed back."""
    located = {**error, "loc": ("body", *error["loc"])}
    if error["type"] == "json_invalid":
        located.pop("input", None)
    return located


def _error(loc: tuple[str | int, ...], msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    """A fault of the body at ``loc``; ``value``: what was sent there, if one value was (a
    missing feature, a wrong row count, shapes: none; said ``"input": null`` before, as if a
    JSON null had been sent)."""
    error = {"type": kind, "loc": ("body", *loc), "msg": msg}
    return error if value is None else {**error, "input": value}


def to_matrix(
    spec: FeatureSpec, request: PredictRequest, max_rows: int, rule: InputRule | None = None
) -> np.ndarray:
    """The model's input for this request, or RequestValidationError naming every problem.
    ``rule``: the deployment's when a model of it takes float64 or integers (``typed_rows``);
    None, float32: the fast path as it was."""
    if (request.features is None) == (request.instances is None):
        raise RequestValidationError(
            [_error((), "send exactly one of 'features' or 'instances'", "value_error")]
        )
    if request.entity is not None or request.entities is not None:
        where = "entity" if request.entity is not None else "entities"
        msg = "this deployment looks no features up by entity: send them all"
        raise RequestValidationError([_error((where,), msg, "extra_forbidden")])
    return _matrix(spec.names, request.features, request.instances, max_rows, rule)


_NAMED = 20
"""Unknown features named one by one in a refusal; the others are counted."""
_ANOTHER_UNKNOWN = {"type": "extra_forbidden", "loc": ("body", "features"),
                    "msg": "another unknown feature", "input": None}  # fmt: skip


def _matrix(
    names: tuple[str, ...],
    features: dict[str, float] | None,
    instances: list[list[float]] | None,
    max_rows: int,
    rule: InputRule | None = None,
) -> np.ndarray:
    """``features`` (one row by name) or ``instances`` (rows in ``names`` order) as a float32
    matrix of ``names``' width (of ``rule``'s wire type with one)."""
    errors: list[dict[str, Any]] = []
    if features is not None:
        given = features
        for name in names:
            if name not in given:
                errors.append(_error(("features", name), f"missing feature {name!r}", "missing"))
        known = set(names)
        unknown = [name for name in given if name not in known]
        for name in unknown[:_NAMED]:
            errors.append(
                _error(("features", name), f"unknown feature {name!r}", "extra_forbidden")
            )
        # The rest only counted (a 422 shows the first few and how many there were): building
        # a fault for each of 60,000 unknown names held the event loop 55 ms (found by hand).
        errors += [_ANOTHER_UNKNOWN] * max(0, len(unknown) - _NAMED)
        if errors:
            raise RequestValidationError(errors)
        rows = [[given[name] for name in names]]
    else:
        assert instances is not None
        rows = instances
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
            if len(row) != len(names):
                errors.append(
                    _error(
                        ("instances", i),
                        f"row has {len(row)} values, the deployment expects {len(names)}",
                        "wrong_length",
                    )
                )
        if errors:
            raise RequestValidationError(errors)
    x64 = np.asarray(rows, dtype=np.float64)
    if rule is not None:
        return typed_rows(x64, rule, names, features is not None)
    with np.errstate(over="ignore"):  # what float32 cannot hold becomes infinity: refused
        x = x64.astype(np.float32)
    too_big = np.isinf(x)  # (3.4028235e38, float32's largest written short, rounds to it)
    if too_big.any():
        for r, c in zip(*np.nonzero(too_big), strict=True):
            loc: tuple[str | int, ...] = (
                ("features", names[c]) if features is not None else
                ("instances", int(r), int(c))
            )  # fmt: skip
            errors.append(_error(loc, "value out of float32 range", "out_of_range", x64[r, c]))
            if len(errors) >= 20:
                break
        raise RequestValidationError(errors)
    return x


def enriched_rows(
    spec: FeatureSpec, request: PredictRequest, max_rows: int, rule: InputRule | None = None
) -> tuple[np.ndarray, list[str]]:
    """The caller's part of the model's input (float32, ``spec.caller_names`` wide) and the
    entity of each row, or RequestValidationError naming every problem."""
    lookup = spec.lookup
    assert lookup is not None
    caller = spec.caller_names
    if (request.entity is None) == (request.entities is None):
        how = "'entity' with 'features'" if caller else "'entity'"
        msg = f"the deployment looks up features by {lookup.key}: send {how}, or 'entities'"
        raise RequestValidationError([_error((), msg, "value_error")])
    errors: list[dict[str, Any]] = []

    def fault(loc: tuple[str | int, ...], msg: str, kind: str, value: Any = None) -> None:
        errors.append(_error(loc, msg, kind, value))

    instances = request.instances
    features = request.features
    where: list[tuple[str | int, ...]]
    if request.entity is not None:
        entities, where = [request.entity], [("entity",)]
        if instances is not None:
            fault(("instances",), "'entity' goes with 'features', 'entities' with 'instances'",
                  "value_error")  # fmt: skip
        features = features or {}
        for name in features:
            if name in lookup.features:
                fault(("features", name), f"{name!r} is looked up by {lookup.key}: do not send it",
                      "extra_forbidden")  # fmt: skip
    else:
        assert request.entities is not None
        entities = request.entities
        where = [("entities", i) for i in range(len(entities))]
        if features is not None:
            fault(("features",), "'entities' go with 'instances', 'entity' with 'features'",
                  "value_error")  # fmt: skip
        if len(entities) > max_rows:
            fault(("entities",), f"{len(entities)} entities, at most {max_rows} per request",
                  "too_long")  # fmt: skip
        if instances is None and not caller:
            instances = [[] for _ in entities]
        elif instances is None:
            fault(("instances",), f"send 'instances': per entity, a row of {list(caller)[:5]}"
                  f"{'...' if len(caller) > 5 else ''}", "missing")  # fmt: skip
        elif len(instances) != len(entities):
            fault(("entities",), f"{len(entities)} entities for {len(instances)} instances: "
                  "one per row", "wrong_length")  # fmt: skip
    for loc, entity in zip(where, entities, strict=True):
        if not ENTITY_PATTERN.fullmatch(entity):
            fault(loc, f"invalid {lookup.key} {entity!r}: use 1-128 characters of A-Z, a-z, "
                  "0-9 and ._:@+=/-", "entity_key", entity)  # fmt: skip
    if errors:
        raise RequestValidationError(errors)
    if instances is not None:
        features = None
    return _matrix(caller, features, instances, max_rows, rule), list(entities)


def merged(
    spec: FeatureSpec,
    caller: np.ndarray,
    entities: list[str],
    stored: Mapping[str, Sequence[bytes | str | None]],
    rule: InputRule | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The model's input: the caller's part and, per row, its entity's stored values (in
    ``spec.lookup.features`` order, None where the store has none) or the spec's defaults; and
    what was looked up, per row, for the envelope and the archive. A value neither stored nor
    defaulted is a 422 that names the entity."""
    lookup = spec.lookup
    assert lookup is not None
    errors: list[dict[str, Any]] = []
    records: dict[str, dict[str, Any]] = {}

    def at(entity: str) -> tuple[str | int, ...]:  # the entity's first row; on a fault only
        return ("entity",) if len(entities) == 1 else ("entities", entities.index(entity))

    for entity, stored_values in stored.items():
        values: dict[str, float] = {}
        defaulted: list[str] = []
        missing: list[str] = []
        for name, value in zip(lookup.features, stored_values, strict=True):
            if value is not None:
                values[name] = stored_number(value)
                if not math.isfinite(values[name]):
                    msg = (f"{lookup.key} {entity!r}: its stored {name!r} "
                           f"({shown_stored(value)!r}) is not a finite float32 number")  # fmt: skip
                    errors.append(_error(at(entity), msg, "entity_value", entity))
            elif name in lookup.defaults:
                values[name] = lookup.defaults[name]
                defaulted.append(name)
            else:
                missing.append(name)
        is_found = len(missing) + len(defaulted) < len(lookup.features)
        if missing and is_found:
            msg = f"{lookup.key} {entity!r} has no stored {missing} and the spec gives no default"
            errors.append(_error(at(entity), msg, "entity_incomplete", entity))
        elif missing:
            msg = f"{lookup.key} {entity!r} not found in the feature store"
            if defaulted:
                msg += f" (and the spec gives no default for {missing})"
            errors.append(_error(at(entity), msg, "entity_not_found", entity))
        record: dict[str, Any] = {"entity": entity, "found": is_found, "values": values}
        if defaulted:
            record["defaulted"] = defaulted
        records[entity] = record
    if errors:
        raise RequestValidationError(errors)
    x = np.empty((len(entities), spec.width), dtype=rule.wire_dtype if rule else np.float32)
    caller_cols, lookup_cols = spec.lookup_columns
    x[:, caller_cols] = caller
    looked = [[records[e]["values"][n] for n in lookup.features] for e in entities]
    looked_x = np.asarray(looked, dtype=np.float64)
    if rule is not None:
        typed_lookups(looked_x, rule, lookup, entities, at)
    x[:, lookup_cols] = looked_x
    return x, [records[e] for e in entities]


def check_matrix(
    spec: FeatureSpec,
    x: np.ndarray,
    max_rows: int,
    names: Sequence[str] | None = None,
    rule: InputRule | None = None,
) -> np.ndarray:
    """What a protocol's own decoder made, held to the same rules as this gateway's JSON: a
    float32 matrix of 1 to ``max_rows`` rows of the features ``names`` (the spec's, or the
    caller's part of a deployment that looks features up), every value finite; with ``rule``,
    of its wire type, the values as decoded (``typed_matrix``)."""
    names = spec.names if names is None else names
    errors: list[dict[str, Any]] = []
    source = x
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: infinite, refused
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(names):
        errors.append(_error((), f"the input has shape {list(x.shape)}, the deployment expects "
                                 f"[rows, {len(names)}]", "wrong_shape"))  # fmt: skip
    elif not 1 <= x.shape[0] <= max_rows:
        errors.append(_error((), f"{x.shape[0]} rows, 1 to {max_rows} per request", "too_long"))
    elif not np.isfinite(x).all():
        r, c = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
        errors.append(_error((r, c), f"row {r}, {names[c]!r}: not a finite float32 number",
                             "finite_number"))  # fmt: skip
    if errors:
        raise RequestValidationError(errors)
    return x if rule is None else typed_matrix(source, rule, names)


def single_request_id(values: Sequence[str]) -> str | None:
    """The ``X-Request-Id`` a request carries (None without one); 422 for several (a proxy that
    adds one to the caller's): predict took the last and jobs and infer the first, so which
    one named the request depended on the route (found by a helper's fuzzing)."""
    if len(values) > 1:
        raise several_request_ids(len(values))
    return values[0] if values else None


def several_request_ids(count: int) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("header", "x-request-id"),
                "msg": f"X-Request-Id is given {count} times: send one",
                "input": None,
            }
        ]
    )


def check_request_id(value: str) -> str:
    if not is_request_id(value):
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "x-request-id"),
                    "msg": "X-Request-Id must be 1-128 printable ASCII characters",
                    "input": value[:130],
                }
            ]
        )
    return value
