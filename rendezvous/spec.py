"""The feature spec: which named inputs a deployment takes, in which order, their training
statistics (kept for feature-drift tracking and the out-of-distribution score of each request),
and which of them are looked up from the online feature store by an entity key instead of sent
by the caller (enrichment)."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def unknown_fields(doc: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The fields of ``doc`` this version does not know: a newer one wrote them, and they are
    written back as they came. Dropped, a state rewritten by an older process in a rolling
    upgrade lost what the newer one had added (found by a helper's upgrade probe: the decile
    bins' counted shares)."""
    return {k: v for k, v in doc.items() if k not in known}


_STATS_FIELDS = frozenset({"mean", "std", "min", "max", "quantiles", "shares", "most_mass"})
_SPEC_FIELDS = frozenset({"version", "names", "stats", "lookup", "centre", "diagonal_centre"})


@dataclass(frozen=True, slots=True)
class FeatureStats:
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float] = field(default_factory=dict)
    """Quantile levels as strings ("0.05", ...) to values."""
    shares: tuple[float, ...] = ()
    """The share of the training rows in each bin the quantiles cut (one more than the
    quantiles), counted as live rows are (``rendezvous.drift.FeatureReference``); empty: read
    off the levels, which is wrong where training values tie (counts, rounded measurements)."""
    most_mass: float | None = None
    """The most of the rows any one value may hold: a one-in-a-million upper bound on the share
    of the training rows' most frequent value (as float32). A live value repeated well past it
    is a feed partly stuck (missing values filled with a constant in some rows), which the
    deciles cannot tell from a spread. None: statistics written before it (the deciles' bound
    alone)."""
    more: Mapping[str, Any] = field(default_factory=dict)
    """Fields a newer version wrote, kept as they came (see ``unknown_fields``)."""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            **self.more,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "quantiles": dict(self.quantiles),
        }
        if self.shares:
            doc["shares"] = list(self.shares)
        if self.most_mass is not None:
            doc["most_mass"] = self.most_mass
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FeatureStats:
        return cls(
            mean=float(doc["mean"]),
            std=float(doc["std"]),
            min=float(doc["min"]),
            max=float(doc["max"]),
            quantiles={str(k): float(v) for k, v in doc.get("quantiles", {}).items()},
            shares=tuple(float(v) for v in doc.get("shares", ())),
            most_mass=None if doc.get("most_mass") is None else float(doc["most_mass"]),
            more=unknown_fields(doc, _STATS_FIELDS),
        )


@dataclass(frozen=True, slots=True)
class TrainingCentre:
    """How the training rows spread around their centre, for a Mahalanobis distance of each
    input (``rendezvous.ood``).

    ``whitening`` is the lower triangle (row by row) of W with ``|W z|^2 = z' C^-1 z``, where
    ``z`` is the row's z-scores (``FeatureStats`` mean and std) and ``C`` their shrunk
    (Ledoit-Wolf) correlation: correlated features, such as a radius and its area, count once,
    and an input that breaks their relation (two columns swapped) lies far away even when
    each value alone looks ordinary. ``distance_quantiles`` are of the training rows' own
    distances, so a live distance can be read against them. An empty ``whitening`` keeps no
    correlation (too many features for its triangle): the distance is the diagonal one, and
    the quantiles are of that."""

    whitening: tuple[tuple[float, ...], ...]
    distance_quantiles: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.whitening):
            if len(row) != i + 1:
                raise ValueError(f"whitening row {i} holds {len(row)} values, not {i + 1}")
            if not all(math.isfinite(v) for v in row):
                raise ValueError(f"whitening row {i} holds a value that is not finite")

    def to_dict(self) -> dict[str, Any]:
        return {
            "whitening": [list(r) for r in self.whitening],
            "distance_quantiles": dict(self.distance_quantiles),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainingCentre:
        return cls(
            whitening=tuple(tuple(float(v) for v in row) for row in doc["whitening"]),
            distance_quantiles={
                str(k): float(v) for k, v in doc.get("distance_quantiles", {}).items()
            },
        )


FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: the models' inputs are float32."""
FLOAT32_INF = FLOAT32_MAX + 2.0**103
"""The least number float32 rounds to infinity (its largest, plus half a step there): every
number below it in size is a finite float32 input, ``3.4028235e38`` as written included."""


def finite_float32(value: float) -> bool:
    """A number the models can take: finite once rounded to float32 (NaN is not)."""
    return abs(value) < FLOAT32_INF


def float32_number(value: Any) -> bool:
    """A feature value as JSON gives it that the models can take: a number (not a bool),
    finite once rounded to float32."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return finite_float32(value)


def shown_stored(value: bytes | str) -> str:
    """A stored value as text for a message (at most 100 characters, whatever its bytes)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return text[:100]


_DECIMAL = r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*"
_DECIMAL_TEXT = re.compile(_DECIMAL)
_DECIMAL_BYTES = re.compile(_DECIMAL.encode())


def decimal_number(value: bytes | str) -> float:
    """``value`` read as a number written in decimal digits (JSON's, with an optional ``+``
    and spaces around), else NaN. Python's ``float`` also reads ``1_2`` as 12, other scripts'
    digits, ``nan`` and ``infinity``: a value written by hand as ``1_2`` was looked up as 12
    (found by a helper's probe)."""
    pattern = _DECIMAL_BYTES if isinstance(value, bytes) else _DECIMAL_TEXT
    return float(value) if pattern.fullmatch(value) else math.nan  # type: ignore[arg-type]


def stored_number(value: bytes | str) -> float:
    """A value of the feature store as a number; NaN when it is none or no float32 (an empty
    value, text, ``inf``, past float32's range)."""
    number = decimal_number(value)
    return number if finite_float32(number) else math.nan


MAX_KEY_NAME = 64
"""Longest name of a lookup's entity key (a column name of the load files)."""


WHOLE_INPUT = "input"
"""What the Open Inference Protocol names a model's one input of every feature
(``gateway.transport.oip_schema``): no lookup key may take it, since the entity ids travel as
an input named after the key."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """Features read from the deployment's online store (one Redis hash per entity) before
    the request enters the input stream, instead of sent by the caller.

    ``key`` names the entity key: the column that holds it in the files ``rdv features load``
    reads, and the word the refusals use ("customer_id 'c-17' not found"). A request names
    its entity in ``entity`` (or ``entities``, one per row). ``defaults`` fill a feature the
    store has no value for (a missing entity included); without one that is a 422."""

    key: str
    features: tuple[str, ...]
    defaults: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not 1 <= len(self.key) <= MAX_KEY_NAME:
            raise ValueError(f"the lookup key must be a name of 1 to {MAX_KEY_NAME} characters")
        if not self.key.isprintable() or self.key != self.key.strip():
            raise ValueError(f"the lookup key {self.key!r} must be printable, without spaces "
                             "around it")  # fmt: skip
        if not self.features:
            raise ValueError("a lookup needs at least one feature")
        if len(set(self.features)) != len(self.features):
            raise ValueError("the looked-up features must be unique")
        for name, value in self.defaults.items():
            if name not in self.features:
                raise ValueError(f"default for {name!r}, which is not a looked-up feature")
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"the default of {name!r} must be a number")
            if not finite_float32(value):
                raise ValueError(f"the default of {name!r} must be a finite float32 number")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "features": list(self.features), "defaults": dict(self.defaults)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Lookup:
        return cls(
            key=str(doc["key"]),
            features=tuple(str(n) for n in doc["features"]),
            defaults={str(k): float(v) for k, v in doc.get("defaults", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    names: tuple[str, ...]
    stats: dict[str, FeatureStats] = field(default_factory=dict)
    lookup: Lookup | None = None
    """Which features come from the online store (None: the caller sends every one)."""
    centre: TrainingCentre | None = None
    """The training rows' correlation, for the Mahalanobis distance of each input (None:
    specs written before it, or without statistics; the distance is then diagonal)."""
    more: Mapping[str, Any] = field(default_factory=dict)
    """Fields a newer version wrote, kept as they came (see ``unknown_fields``)."""

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a feature spec needs at least one feature")
        whitening = self.centre.whitening if self.centre is not None else ()
        if whitening and len(whitening) != len(self.names):
            raise ValueError(f"the training centre is of {len(whitening)} "
                             f"features, the spec has {len(self.names)}")  # fmt: skip
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature names must be unique")
        if self.lookup is not None:
            unknown = [n for n in self.lookup.features if n not in self.names]
            if unknown:
                raise ValueError(f"looked-up features not in the spec: {unknown[:5]}")

    @property
    def width(self) -> int:
        return len(self.names)

    @property
    def version(self) -> str:
        """Stable id of the names and their order: two specs that feed a model the same way
        share it, so an archived row says exactly which layout it was built for."""
        return _layout_id(tuple(self.names))

    @property
    def caller_names(self) -> tuple[str, ...]:
        """The features the caller sends, in spec order: all of them without a lookup."""
        if self.lookup is None:
            return self.names
        return _split(self.names, self.lookup.features)[0]

    @property
    def lookup_columns(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Columns of the model's input that the caller's values fill, and those the looked-up
        values fill (in ``lookup.features`` order)."""
        assert self.lookup is not None
        return _split(self.names, self.lookup.features)[1:]

    def with_lookup(self, lookup: Lookup | None) -> FeatureSpec:
        return FeatureSpec(names=self.names, stats=self.stats, lookup=lookup, centre=self.centre,
                           more=self.more)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            **self.more,
            "version": self.version,
            "names": list(self.names),
            "stats": {k: v.to_dict() for k, v in self.stats.items()},
        }
        if self.lookup is not None:
            doc["lookup"] = self.lookup.to_dict()
        if self.centre is not None and self.centre.whitening:
            doc["centre"] = self.centre.to_dict()
        elif self.centre is not None:
            # Not as a "centre" of no rows: a process of the version before, in a rolling
            # upgrade, refused such a spec and with it every deployment's (its log bin stopped
            # archiving; found by a helper's probe). It reads this as no centre: diagonal.
            doc["diagonal_centre"] = {"distance_quantiles": dict(self.centre.distance_quantiles)}
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FeatureSpec:
        lookup, centre = doc.get("lookup"), doc.get("centre")
        diagonal = doc.get("diagonal_centre")
        if centre is None and diagonal is not None:
            centre = {"whitening": [], **diagonal}
        return cls(
            names=tuple(str(n) for n in doc["names"]),
            stats={k: FeatureStats.from_dict(v) for k, v in doc.get("stats", {}).items()},
            lookup=None if lookup is None else Lookup.from_dict(lookup),
            centre=None if centre is None else TrainingCentre.from_dict(centre),
            more=unknown_fields(doc, _SPEC_FIELDS),
        )

    @classmethod
    def from_names(cls, names: Sequence[str]) -> FeatureSpec:
        return cls(names=tuple(names))


@functools.lru_cache(maxsize=256)
def _layout_id(names: tuple[str, ...]) -> str:
    """Cached: the gateway stamps every envelope with it."""
    digest = hashlib.sha256("\x1f".join(names).encode()).hexdigest()
    return f"fs-{digest[:12]}"


@functools.lru_cache(maxsize=256)
def _split(
    names: tuple[str, ...], looked_up: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """(the caller's names, their columns, the looked-up features' columns); cached: every
    enriched request needs them."""
    taken = set(looked_up)
    caller = tuple(n for n in names if n not in taken)
    where = {n: i for i, n in enumerate(names)}
    return caller, tuple(where[n] for n in caller), tuple(where[n] for n in looked_up)
