"""The cluster state's series kept for a scrape that cannot read Redis: the last ones read,
served again for up to ``KEPT_S``, with two gauges saying whether this scrape read them
(``rdv_state_read_ok``) and how old they are (``rdv_state_age_seconds``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

KEPT_S = 60.0
"""How long a scrape that cannot read Redis serves the cluster state last read: long enough for
a failover or a restart (seconds) to leave alerts as they were; past it the series go, since
what they describe is no longer known."""


class KeptState:
    """The cluster-state series of the last scrape that read Redis, served again while Redis
    does not answer (for up to ``KEPT_S``), and two gauges saying so. A scrape during a 2 s
    stall dropped every series read from Redis: an alert on them (no live worker, drift)
    resolved, and fired again a scrape later (a helper's probe)."""

    def __init__(self, shared_dir: str | None = None) -> None:
        """``shared_dir``: a folder every gateway process of one port shares (the
        multi-process metrics folder), where the last state read by any of them is kept.
        Each process kept only what its own scrapes read, and a scrape lands on either:
        during a Redis stall one served a state 42 s old while the other's was 4 s old,
        so ``rdv_worker_scored_total`` read 1360, 1330, 1360 (a counter reset to
        Prometheus) and the series of partitions added meanwhile went and came back (a
        helper's metrics probe). ``now`` is ``time.monotonic()``, the host's, the same in
        every process."""
        self.body = b""
        self.read_at: float | None = None
        self.ok = False
        self.path = None if shared_dir is None else os.path.join(shared_dir, "kept-state")

    def read(self, body: bytes, now: float) -> None:
        self.body, self.read_at, self.ok = body, now, True
        if self.path is not None:
            with contextlib.suppress(OSError):  # a full disk: this process keeps its own
                spare = f"{self.path}.{os.getpid()}"
                with open(spare, "wb") as f:
                    f.write(repr(now).encode() + b"\n" + body)
                os.replace(spare, self.path)

    def missed(self) -> None:
        self.ok = False
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                stamp, _, body = f.read().partition(b"\n")
            read_at = float(stamp)
        except (OSError, ValueError):
            return
        if self.read_at is None or read_at > self.read_at:  # another process read it later
            self.body, self.read_at = body, read_at

    def served(self, now: float) -> bytes:
        age = None if self.read_at is None else now - self.read_at
        kept = age is not None and (self.ok or age <= KEPT_S)
        registry = CollectorRegistry()
        registry.register(_ReadGauges(self.ok, age if kept else None))
        return (self.body if kept else b"") + generate_latest(registry)


class _ReadGauges(Collector):
    def __init__(self, ok: bool, age_s: float | None):
        self.ok = ok
        self.age_s = age_s

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "rdv_state_read_ok",
            "1 when this scrape read the cluster state's series from Redis; 0 when it could "
            f"not (they are then the last read, for up to {KEPT_S:g} s: rdv_state_age_seconds)",
        )
        ok.add_metric([], 1.0 if self.ok else 0.0)
        yield ok
        if self.age_s is not None:
            age = GaugeMetricFamily(
                "rdv_state_age_seconds",
                f"age of the cluster state in this scrape (absent past {KEPT_S:g} s unread)",
            )
            age.add_metric([], round(self.age_s, 3))
            yield age


__all__ = ["KEPT_S", "KeptState"]
