"""Validation of a deployment whose models take float64 or integers (``rendezvous.input_types``):
its rows keep every value as the caller wrote it (float64 carries a JSON number exactly, int64
an integer), and a value a model cannot take as is is a 422 naming its row and column, never a
silent truncation. A float32 deployment never comes here: its path is as it was."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError

from rendezvous.input_types import InputRule, faults
from rendezvous.spec import FLOAT32_INF, Lookup

_SHOWN = 20
"""Faults built one by one; a 422 names the first few anyway."""

Where = tuple[str | int, ...]


def _fault(loc: Where, msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


def typed_rows(x64: np.ndarray, rule: InputRule, names: Sequence[str], by_name: bool) -> np.ndarray:
    """A JSON body's rows (float64, as parsed) in ``rule``'s wire type. Beyond float32's range
    is refused as on every deployment (drift and the OOD score read a float view of the rows);
    then each value an integer model cannot take."""
    errors: list[dict[str, Any]] = []

    def at(r: int, c: int) -> Where:
        return ("features", names[c]) if by_name else ("instances", r, c)

    for r, c in np.argwhere(np.abs(x64) >= FLOAT32_INF)[:_SHOWN].tolist():
        errors.append(_fault(at(r, c), "value out of float32 range", "out_of_range", x64[r, c]))
    if not errors:
        for r, c, kind, why in itertools.islice(faults(x64, rule), _SHOWN):
            errors.append(_fault(at(r, c), f"row {r}, {names[c]!r}: {why}", kind, x64[r, c]))
    if errors:
        raise RequestValidationError(errors)
    return x64.astype(rule.wire_dtype, copy=False)


def typed_matrix(source: np.ndarray, rule: InputRule, names: Sequence[str]) -> np.ndarray:
    """A protocol decoder's matrix (FP32, FP64, or INT64/INT32 as sent; already held to the
    float32 rules) in ``rule``'s wire type, from its own values: float64 holds floats exactly,
    and integers are checked as integers."""
    given = np.asarray(source)
    x = given if given.dtype.kind in "iu" else given.astype(np.float64, copy=False)
    errors = [_fault((r, c), f"row {r}, {names[c]!r}: {why}", kind)
              for r, c, kind, why in itertools.islice(faults(x, rule), _SHOWN)]  # fmt: skip
    if errors:
        raise RequestValidationError(errors)
    return x.astype(rule.wire_dtype, copy=False)


def typed_lookups(
    looked: np.ndarray,
    rule: InputRule,
    lookup: Lookup,
    entities: Sequence[str],
    at: Callable[[str], Where],
) -> None:
    """A 422 naming each entity whose stored value an integer model cannot take as is."""
    errors = []
    for r, c, _kind, why in itertools.islice(faults(looked, rule), _SHOWN):
        msg = f"{lookup.key} {entities[r]!r}: its stored {lookup.features[c]!r}: {why}"
        errors.append(_fault(at(entities[r]), msg, "entity_value", entities[r]))
    if errors:
        raise RequestValidationError(errors)
