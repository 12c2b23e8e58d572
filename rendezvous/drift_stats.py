"""The statistics under the online drift detectors (``rendezvous.drift_detect``,
``rendezvous.drift_prior``): CUSUM thresholds from a false-alarm budget (Wald's bound), many
Bernoulli CUSUMs at once, Kolmogorov-Smirnov critical values and exact binomial tails, apart
from the detectors' bookkeeping so that each sum can be checked on its own.

Numpy and the standard library only: scipy would do two of the sums below, but takes a second to
import, and the prior's first evaluation runs on a gateway's event loop (the tests check those
sums against scipy.stats).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np


def cusum_h(alarms_per_100k: float, streams: int) -> float:
    """Threshold of ``streams`` CUSUMs sharing a budget of alarms per 100,000 rows (Wald)."""
    per_row = alarms_per_100k / 100_000 / max(streams, 1)
    return math.log(1.0 / per_row)


def ks_critical(n: int | np.ndarray, alpha: float) -> np.ndarray:
    """One-sample two-sided Kolmogorov-Smirnov critical value at level ``alpha`` for ``n``
    values (Stephens' approximation of the exact tail: within 0.3 % of ``scipy.stats.kstwo``
    from n = 100, and above it, so conservative, for fewer values)."""
    c = math.sqrt(-0.5 * math.log(alpha / 2.0))
    root = np.sqrt(np.maximum(np.asarray(n, dtype=np.float64), 1.0))
    return np.asarray(c / (root + 0.12 + 0.11 / root))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly (n is a few dozen here; scipy.stats
    would do the same but takes a second to import, on the gateway's event loop)."""
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1)))


@functools.lru_cache(maxsize=1024)
def stuck_count(rows: int, mass: float, alpha: float) -> int:
    """Fewest rows of ``rows`` holding one value that a training mass of at most ``mass`` on
    that value gives with probability below ``alpha`` (exact binomial tail, summed from the
    top in logs: the partly-stuck test asks of 800 rows, whose terms ``binomial_tail``
    would build from integers of hundreds of digits)."""
    if mass <= 0.0:
        return 2
    if mass >= 1.0:
        return rows + 1
    log_p, log_q = math.log(mass), math.log1p(-mass)
    head = math.lgamma(rows + 1)
    tail = 0.0
    for j in range(rows, 1, -1):  # P(X >= j), from the top, until it passes alpha
        term = head - math.lgamma(j + 1) - math.lgamma(rows - j + 1) + j * log_p
        tail += math.exp(term + (rows - j) * log_q)
        if tail > alpha:
            return j + 1
    return 2


@dataclass
class Cusum:
    """Many one-sided Bernoulli CUSUMs (one per column) of null ``p0`` against ``p1``, with a
    reverse CUSUM per column that clears an alarm once the evidence for ``p0`` is strong."""

    p0: np.ndarray
    p1: np.ndarray
    h: float
    clear_h: float | np.ndarray
    """One level for every column, or one a column."""
    clear_p1: np.ndarray | None = None
    """The rate the clear weighs ``p0`` against (default ``p1``): the lowest rate that is
    still a fault. Against ``p1`` alone, a rate between the two (a tenth of the rows broken,
    against 3 % and 30 %) sides with ``p0`` and clears an alarm that still stands."""
    s: np.ndarray = field(init=False)
    back: np.ndarray = field(init=False)
    alarm: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.up = np.log(self.p1 / self.p0)
        self.down = np.log((1 - self.p1) / (1 - self.p0))
        q = self.p1 if self.clear_p1 is None else self.clear_p1
        self.clear_up = np.log(self.p0 / q)  # the reverse walk: evidence for p0 against q
        self.clear_down = np.log((1 - self.p0) / (1 - q))
        self.s = np.zeros(self.p0.shape)
        self.back = np.zeros(self.p0.shape)
        self.alarm = np.zeros(self.p0.shape, dtype=bool)

    @staticmethod
    def _run(start: np.ndarray, inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Page's recursion s = max(0, s + inc) over the rows of ``inc`` at once: the final
        value and the highest along the way."""
        c = np.cumsum(inc, axis=0)
        path = c - np.minimum(np.minimum.accumulate(c, axis=0), -start)
        return path[-1], path.max(axis=0)

    @classmethod
    def _walk(
        cls, start: np.ndarray, hits: np.ndarray, up: np.ndarray, down: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_run`` of ``up`` where ``hits``, else ``down``. A column without a hit in the
        batch (nearly every column, on normal traffic) adds one constant per row, so its walk
        is a line clipped at zero: its end and its highest point are read off without the
        cumulative sums, which cost about 3.5 ns a value whatever the layout (numpy's
        accumulate is not vectorised): 150 us of the log bin's 800 for a 100-row request."""
        n = len(hits)
        final = np.maximum(start + n * down, 0.0)
        peak = np.maximum(np.maximum(start + down, final), 0.0)
        busy = np.flatnonzero(hits.any(axis=0))
        if busy.size:
            inc = np.where(hits[:, busy], up[busy], down[busy])
            final[busy], peak[busy] = cls._run(start[busy], inc)
        return final, peak

    def update(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed (rows x columns) booleans; returns the columns raised and cleared."""
        self.s, peak = self._walk(self.s, hits, self.up, self.down)
        self.s = np.minimum(self.s, 2 * self.h)
        raised = ~self.alarm & (peak > self.h)
        self.back[raised] = 0.0
        # The reverse walk matters only where an alarm stands (elsewhere it is zeroed below).
        watched = np.flatnonzero(self.alarm | raised)
        back_peak = np.zeros(self.back.shape)
        if watched.size:
            self.back[watched], back_peak[watched] = self._walk(
                self.back[watched], hits[:, watched], self.clear_up[watched],
                self.clear_down[watched],
            )  # fmt: skip
        cleared = self.alarm & (back_peak > self.clear_h)
        self.alarm = (self.alarm | raised) & ~cleared
        self.s[cleared] = 0.0
        self.back[~self.alarm] = 0.0
        return raised, cleared

    def reset(self, columns: np.ndarray) -> None:
        self.s[columns] = 0.0
        self.back[columns] = 0.0
        self.alarm[columns] = False
