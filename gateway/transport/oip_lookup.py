"""An Open Inference Protocol request to a deployment that looks features up by entity: the
entity ids come as a BYTES input named as the lookup's key (one per row, ``[rows]`` or
``[rows, 1]``), the caller's features as usual (one input ``INPUT`` of the features not looked
up, or one input per such feature). What the JSON route takes as ``entities`` and
``instances``; the service looks the rest up as it does for that route.
"""

from __future__ import annotations

import numpy as np
from fastapi.exceptions import RequestValidationError

from gateway.transport.oip_codec import InferRequest
from gateway.transport.oip_schema import INPUT
from rendezvous.names import ENTITY_PATTERN
from rendezvous.spec import FeatureSpec


def lookup_rows(request: InferRequest, spec: FeatureSpec) -> tuple[np.ndarray, list[str]]:
    """The caller's part of the rows (``spec.caller_names`` wide) and each row's entity, or
    RequestValidationError naming what is wrong."""
    lookup = spec.lookup
    assert lookup is not None
    key, caller = lookup.key, spec.caller_names
    found = [(i, t) for i, t in enumerate(request.inputs) if t.name == key]
    if not found:
        parts = f"; and the other features as {INPUT!r} [rows, {len(caller)}]" if caller else ""
        raise _refused(("inputs",), f"missing input {key!r}: this deployment looks features "
                       f"up by {key}, one BYTES id per row{parts}", "missing")  # fmt: skip
    k, ids = found[0]
    if ids.values.dtype != object:
        raise _refused(("inputs", k, "datatype"), f"input {key!r} holds entity ids: BYTES",
                       "datatype")  # fmt: skip
    rows = ids.shape[0] if ids.shape else 0
    if ids.shape in ((0,), (0, 1)):  # the right shape, of no row: said "the wrong shape"
        raise _refused(("inputs", k, "shape"), f"input {key!r} has shape {list(ids.shape)}: no "
                       "id, so no row; a request holds at least one row", "too_short")  # fmt: skip
    if ids.shape not in ((rows,), (rows, 1)):
        raise _refused(("inputs", k, "shape"), f"input {key!r} has shape {list(ids.shape)}: "
                       "one id per row, [rows] or [rows, 1]", "wrong_shape")  # fmt: skip
    entities = [str(v) for v in ids.values.reshape(-1)]
    rule = "use 1-128 characters of A-Z, a-z, 0-9 and ._:@+=/-"
    faults = [
        _fault(("inputs", k, "data", r), f"invalid {key} {entity[:80]!r}: {rule}", "entity_key")
        for r, entity in enumerate(entities)
        if not ENTITY_PATTERN.fullmatch(entity)
    ]
    if faults:
        raise RequestValidationError(faults)
    others = [(i, t) for i, t in enumerate(request.inputs) if i != k]
    for i, extra in others:  # said "unknown input", though the spec names it (a probe)
        if extra.name in lookup.features:
            raise _refused(("inputs", i, "name"), f"input {extra.name!r} is looked up by {key}: "
                           "do not send it", "looked_up_sent")  # fmt: skip
    if not caller:
        if others:
            i, extra = others[0]
            raise _refused(("inputs", i, "name"), f"unknown input {extra.name!r}: every "
                           f"feature is looked up by {key}; send {key!r} alone",
                           "unknown_input")  # fmt: skip
        return np.zeros((rows, 0), dtype=np.float32), entities
    x = request.columns(caller, skip=key)
    if x.shape[0] != rows:
        raise _refused(("inputs", k, "shape"), f"{rows} {key} ids for {x.shape[0]} rows of "
                       "features: one per row", "wrong_length")  # fmt: skip
    return x, entities


def lookup_inputs(spec: FeatureSpec, datatype: str = "FP32") -> list[dict[str, object]]:
    """The inputs the model metadata names for a deployment that looks features up
    (``datatype``: its caller's part's, FP64 where its models take float64 or integers)."""
    assert spec.lookup is not None
    inputs: list[dict[str, object]] = [
        {"name": spec.lookup.key, "datatype": "BYTES", "shape": [-1]}
    ]
    if spec.caller_names:
        inputs.append({"name": INPUT, "datatype": datatype, "shape": [-1, len(spec.caller_names)]})
    return inputs


def _fault(loc: tuple[str | int, ...], msg: str, kind: str) -> dict[str, object]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


def _refused(loc: tuple[str | int, ...], msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([_fault(loc, msg, kind)])
