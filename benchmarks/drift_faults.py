"""The drift benchmark's data and faults: the breast-cancer rows its traffic draws from, the
faults it injects one at a time (each a way of changing every row of a request), and issue
16's targets for each group. Apart from ``benchmarks.drift_bench`` so that the run, its
sender (the ``Rows`` it sends) and the tests take them from a module that starts nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.train import demo_data, training_stats

Rows = Callable[[np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class Data:
    names: list[str]
    x: np.ndarray
    y: np.ndarray
    held_out: np.ndarray
    stats: dict[str, Any]

    @classmethod
    def load(cls) -> Data:
        d = demo_data()
        x = np.vstack([d.x_train, d.x_test]).astype(np.float64)
        y = np.concatenate([d.y_train, d.y_test])
        stats = training_stats(d.names, d.x_train)
        return cls(d.names, x, y, d.x_test.astype(np.float64), stats)

    def col(self, name: str) -> int:
        return self.names.index(name)

    def normal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.x[rng.integers(0, len(self.x), n)]


@dataclass(frozen=True)
class Fault:
    name: str
    group: str
    """gross, prior, moderate or subtle: the target it is held to."""
    rows: Rows


def faults(data: Data) -> list[Fault]:
    st = data.stats

    def on(name: str, how: Callable[[np.ndarray], np.ndarray]) -> Rows:
        i = data.col(name)

        def rows(rng: np.random.Generator, n: int) -> np.ndarray:
            x = data.normal(rng, n)
            x[:, i] = how(x[:, i])
            return x

        return rows

    def swapped(a: str, b: str) -> Rows:
        i, j = data.col(a), data.col(b)

        def rows(rng: np.random.Generator, n: int) -> np.ndarray:
            x = data.normal(rng, n)
            x[:, [i, j]] = x[:, [j, i]]
            return x

        return rows

    def prior(positive: float) -> Rows:
        pos, neg = data.x[data.y == 1], data.x[data.y == 0]

        def rows(rng: np.random.Generator, n: int) -> np.ndarray:
            k = rng.random(n) < positive
            out = neg[rng.integers(0, len(neg), n)]
            out[k] = pos[rng.integers(0, len(pos), int(k.sum()))]
            return out

        return rows

    def partly(name: str, share: float) -> Rows:
        i = data.col(name)

        def rows(rng: np.random.Generator, n: int) -> np.ndarray:
            x = data.normal(rng, n)
            x[rng.random(n) < share, i] = mean(name)
            return x

        return rows

    def mean(name: str) -> float:
        return float(st[name].mean)

    def std(name: str) -> float:
        return float(st[name].std)

    return [
        Fault("columns swapped: mean radius <-> mean texture", "gross",
              swapped("mean radius", "mean texture")),
        Fault("unit change: mean radius x10", "gross", on("mean radius", lambda v: v * 10)),
        Fault("unit change: worst area /100", "gross", on("worst area", lambda v: v / 100)),
        Fault("stuck: mean smoothness at its training mean", "gross",
              on("mean smoothness", lambda v: np.full_like(v, mean("mean smoothness")))),
        Fault("missing as zero: texture error", "gross", on("texture error", np.zeros_like)),
        Fault("missing as zero: mean concavity (0 is in range)", "gross",
              on("mean concavity", np.zeros_like)),
        Fault("out of range: area error at 3x the training max", "gross",
              on("area error", lambda v: np.full_like(v, 3 * st["area error"].max))),
        Fault("partly stuck: a fifth of mean texture filled with its training mean", "moderate",
              partly("mean texture", 0.2)),
        Fault("class prior: 90 % malignant", "prior", prior(0.1)),
        Fault("class prior: 85 % benign", "prior", prior(0.85)),
        Fault("moderate: mean texture +1 std", "moderate",
              on("mean texture", lambda v: v + std("mean texture"))),
        Fault("moderate: worst concavity x1.5", "moderate",
              on("worst concavity", lambda v: v * 1.5)),
        Fault("subtle: mean radius x1.1 (10 % scale)", "subtle",
              on("mean radius", lambda v: v * 1.1)),
        Fault("subtle: worst smoothness +10 % of its mean", "subtle",
              on("worst smoothness", lambda v: v + 0.1 * mean("worst smoothness"))),
        Fault("subtle: area error x1.25 (25 % scale)", "subtle",
              on("area error", lambda v: v * 1.25)),
        Fault("subtle: mean texture +25 % of its mean", "subtle",
              on("mean texture", lambda v: v + 0.25 * mean("mean texture"))),
    ]  # fmt: skip


TARGETS = {"gross": (200, 1000), "prior": (500, None), "moderate": (500, None),
           "subtle": (5000, None)}  # fmt: skip
"""Requests to first alert, and to clear, that issue 16 asks for."""
