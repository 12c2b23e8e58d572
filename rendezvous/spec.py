"""The feature spec: which named inputs a deployment takes, in which order, and their training
statistics (kept for feature-drift tracking)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FeatureStats:
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float] = field(default_factory=dict)
    """Quantile levels as strings ("0.05", ...) to values."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "quantiles": dict(self.quantiles),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FeatureStats:
        return cls(
            mean=float(doc["mean"]),
            std=float(doc["std"]),
            min=float(doc["min"]),
            max=float(doc["max"]),
            quantiles={str(k): float(v) for k, v in doc.get("quantiles", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    names: tuple[str, ...]
    stats: dict[str, FeatureStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a feature spec needs at least one feature")
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature names must be unique")

    @property
    def width(self) -> int:
        return len(self.names)

    @property
    def version(self) -> str:
        """Stable id of the names and their order: two specs that feed a model the same way
        share it, so an archived row says exactly which layout it was built for."""
        return _layout_id(tuple(self.names))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "names": list(self.names),
            "stats": {k: v.to_dict() for k, v in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            names=tuple(str(n) for n in doc["names"]),
            stats={k: FeatureStats.from_dict(v) for k, v in doc.get("stats", {}).items()},
        )

    @classmethod
    def from_names(cls, names: Sequence[str]) -> FeatureSpec:
        return cls(names=tuple(names))


@functools.lru_cache(maxsize=256)
def _layout_id(names: tuple[str, ...]) -> str:
    """Cached: the gateway stamps every envelope with it."""
    digest = hashlib.sha256("\x1f".join(names).encode()).hexdigest()
    return f"fs-{digest[:12]}"
