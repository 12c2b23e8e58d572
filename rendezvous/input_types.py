"""The tensor types a model's input may have, and what a deployment's input must be so that
every model holding one of its roles can take it unchanged.

Models take float32 (the fast path, as ever), float64 or integers (skl2onnx's
``DoubleTensorType``, ``Int64TensorType``, ``Int32TensorType``: count features, one-hot codes,
pipelines converted from doubles). float32 cannot carry every float64 or integer exactly, so a
deployment whose roles take anything else carries its rows on the bus as float64 or int64
(``RequestEnvelope.wire_type``) and each worker casts to its own model's type. Pure: no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

FLOAT32, FLOAT64, INT64, INT32 = "float32", "float64", "int64", "int32"
ONNX_TYPES = {
    "tensor(float)": FLOAT32,
    "tensor(double)": FLOAT64,
    "tensor(int64)": INT64,
    "tensor(int32)": INT32,
}
"""An ONNX input type -> the name the metadata, the deployment state and the envelope use."""
DTYPES: dict[str, np.dtype] = {FLOAT32: np.dtype("<f4"), FLOAT64: np.dtype("<f8"),
                               INT64: np.dtype("<i8"), INT32: np.dtype("<i4")}  # fmt: skip
WIRE_TYPES = frozenset({FLOAT32, FLOAT64, INT64})
"""What an envelope's matrix may be: float32 (and an envelope that says nothing), float64
(carries every float32 and float64 exactly), int64 (every integer a request may hold)."""

EXACT_INTEGER = 2**53 - 1
"""The largest integer an int64 input takes: JSON numbers are read as doubles, which hold every
integer up to here exactly and no longer every one beyond (9007199254740993 reads as ...992),
so past it the integer a model got could differ from the one the caller wrote, unseen."""
_INTEGER_RANGES = {INT32: (-(2**31), 2**31 - 1), INT64: (-EXACT_INTEGER, EXACT_INTEGER)}


@dataclass(frozen=True, slots=True)
class InputRule:
    """What a deployment's rows must be beyond finite float32 numbers (the rule for every
    deployment), and the type they travel in."""

    wire_type: str
    integer: str | None = None
    """The narrowest integer type among the roles' models (None: no model takes integers):
    every value must be an integer within its range."""

    @property
    def wire_dtype(self) -> np.dtype:
        return DTYPES[self.wire_type]

    @property
    def bounds(self) -> tuple[int, int]:
        assert self.integer is not None
        return _INTEGER_RANGES[self.integer]


@functools.lru_cache(maxsize=64)
def input_rule(types: tuple[str, ...]) -> InputRule | None:
    """The rule for a deployment whose roles' models take ``types``; None when every one takes
    float32 (or the state predates input types): the float32 path, unchanged. With an integer
    model the rows must be integers, which int64 carries exactly to every model; else with a
    float64 one they travel as float64."""
    known = set(types) - {FLOAT32}
    if not known:
        return None
    unknown = known - set(ONNX_TYPES.values())
    if unknown:
        raise ValueError(f"unknown input types {sorted(unknown)}")
    if INT32 in known:
        return InputRule(INT64, INT32)
    if INT64 in known:
        return InputRule(INT64, INT64)
    return InputRule(FLOAT64)


def deployment_types(model_types: Iterable[str]) -> tuple[str, ...]:
    """What a deployment state records of its roles' models' input types: () when all take
    float32 (a state as before, which older processes read the same)."""
    found = set(model_types)
    return () if found <= {FLOAT32} else tuple(sorted(found))


def faults(x: np.ndarray, rule: InputRule) -> Iterator[tuple[int, int, str, str]]:
    """(row, column, kind, why) of each value of ``x`` (float64, finite, or integers) that
    ``rule``'s integer type cannot take as it is: not an integer, or beyond its range. Never a
    silent truncation."""
    if rule.integer is None:
        return
    low, high = rule.bounds
    if x.dtype.kind in "iu":  # integers as sent (an INT64 input): compared exactly, and shown
        # as sent (as a double, 9007199254740993 read ...992; a helper's probe)
        for r, c in zip(*np.nonzero((x < low) | (x > high)), strict=True):
            why = f"{int(x[r, c])} is beyond {_range_text(rule.integer)}"
            yield int(r), int(c), "out_of_range", why
        return
    with np.errstate(invalid="ignore"):
        bad = (x != np.trunc(x)) | (x < low) | (x > high)
    for r, c in zip(*np.nonzero(bad), strict=True):
        value = float(x[r, c])
        if value != int(value):
            why = f"{value!r} is not an integer (a model takes {rule.integer})"
            kind = "int_from_float"
        else:
            kind, why = "out_of_range", f"{int(value)} is beyond {_range_text(rule.integer)}"
        yield int(r), int(c), kind, why


def _range_text(integer: str) -> str:
    low, high = _INTEGER_RANGES[integer]
    if integer == INT64:
        return (f"+-{high}, the integers an int64 input takes exactly (the gateway reads "
                "every row as doubles, which hold every integer only up to there)")  # fmt: skip
    return f"int32's range [{low}, {high}]"


def unfit(x: np.ndarray, dtype: np.dtype) -> str | None:
    """Why ``x`` (one request's rows, as the envelope carried them) cannot be cast to an
    integer model's ``dtype`` unchanged, or None; a float model takes anything (float32 rounds,
    as it always did). The gateway checks every value first: this guards rows published before
    a role changed to an integer model, and replays of archives made before."""
    if dtype.kind != "i" or (x.dtype == dtype) or x.size == 0:
        return None
    info = np.iinfo(dtype)
    low, high = max(info.min, -EXACT_INTEGER), min(info.max, EXACT_INTEGER)
    if x.dtype.kind == "f":
        whole = np.isfinite(x) & (x == np.trunc(x))
        if not whole.all():
            r, c = (int(i) for i in np.argwhere(~whole)[0])
            return f"row {r}, column {c}: {float(x[r, c])!r} is not an integer ({dtype.name} model)"
    out = (x < low) | (x > high)
    if out.any():
        r, c = (int(i) for i in np.argwhere(out)[0])
        return f"row {r}, column {c}: {x[r, c]} is beyond the {dtype.name} model's range"
    return None
