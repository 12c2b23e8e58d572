"""Turns what this gateway process sees into drift sketches, one per deployment a second.

Drift is judged over thousands of requests, but reading thousands of decision records and
input envelopes back from Redis at every evaluation would cost more than serving them. So each
process aggregates as it goes, in memory and off the request path: the feature rows of every
request it accepted (binned against the training quantiles at every flush, in one vectorised
call, with their out-of-distribution evidence: rows outside the training range, per feature,
and distances to the training centre) and the scores and divergence of every decision record
it closed (and a multiclass real model's predicted classes, counted at the flush as well).
Every ``interval_s`` (0.25 s) it appends one ``Sketch`` per deployment to
``rdv:{dep}:drift:sketches``; the drift monitor merges the sketches of a window. A sketch never
mixes two real models: a promotion starts a new one. The decisions are also handed to the
prediction-prior detector (``drift_online``); the rows are not judged one by one here: the log
bin's feature detectors (``models.feature_watch``) judge every request's rows off this path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability.drift_online import OnlineDrift
from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.decision import DecisionRecord
from rendezvous.drift import Sketch
from rendezvous.drift_reference import FeatureReference, FeatureReferences
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

SKETCH_FIELD = b"s"
MAX_PENDING_ROWS = 200_000
"""Rows kept between two flushes at most; beyond, rows are sampled out (a flush that keeps
failing must not grow memory without bound)."""
BIN_SLICE = 500
"""Requests' rows binned between two turns of the event loop when sketches are flushed."""
UNSENT_S = 30.0
"""How long a sketch Redis did not take is tried again: longer than a cluster's election at
its usual settings (``cluster-node-timeout`` plus about a second)."""


@dataclass
class _Pending:
    """What a sketch's decisions since the last flush said, counted at the flush in one numpy
    pass: a binary model's positive-class scores, a multiclass model's rows of probabilities
    (their top probability is the score, their arg max the predicted class)."""

    sketch: Sketch
    real: list[float] = field(default_factory=list)
    canary: list[float] = field(default_factory=list)
    real_rows: list[Sequence[float]] = field(default_factory=list)
    canary_rows: list[Sequence[float]] = field(default_factory=list)

    def add(self, probabilities: list[list[float]], canary: bool) -> None:
        """A record's rows as they are: no numpy per decision (the request path)."""
        if not probabilities:
            return
        if len(probabilities[0]) == 2:
            (self.canary if canary else self.real).extend(row[1] for row in probabilities)
        elif len(probabilities[0]) > 2:
            (self.canary_rows if canary else self.real_rows).extend(probabilities)

    def count(self) -> None:
        sketch = self.sketch
        for rows, canary in ((self.real_rows, False), (self.canary_rows, True)):
            width = len(rows[0]) if rows else 0
            matrix = np.asarray([r for r in rows if len(r) == width], dtype=np.float64)
            if not len(matrix):
                continue
            if canary:
                self.canary.extend(matrix.max(axis=1).tolist())
            else:
                sketch.add_predictions(matrix)  # its scores and its predicted classes
        real = np.asarray(self.real, dtype=np.float64) if self.real else None
        sketch.add_scores(real, np.asarray(self.canary, dtype=np.float64) if self.canary else None)


class DriftFeed:
    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        *,
        interval_s: float = 0.25,
        maxlen: int = 20_000,
        on_dropped: Callable[[str, int], None] | None = None,
        online: OnlineDrift | None = None,
    ):
        self.client = client
        self.deployments = deployments
        self.interval_s = interval_s
        self.maxlen = maxlen
        self._rows: dict[str, list[np.ndarray]] = {}
        self._pending_rows = 0
        self._open: dict[str, Sketch] = {}
        self._closed: list[tuple[str, Sketch]] = []
        self._references = FeatureReferences()
        self._scores: dict[int, _Pending] = {}
        """Real's and canary's answers per sketch since the last flush (by the sketch's id)."""
        self.on_dropped = on_dropped
        """Told of the rows left out when too many are waiting (``rdv_drift_dropped_rows``)."""
        self.online = online
        """The prediction-prior detector, handed every decision too (``drift_online``)."""

    # -- observing (cheap: called on the request path and per decision) ---------------------

    def observe_rows(self, deployment: str, features: np.ndarray) -> None:
        if self._pending_rows >= MAX_PENDING_ROWS:
            if self.on_dropped is not None:
                self.on_dropped(deployment, len(features))
            return
        self._rows.setdefault(deployment, []).append(features)
        self._pending_rows += len(features)

    def observe_decision(self, record: DecisionRecord) -> None:
        if self.online is not None:
            self.online.observe_decision(record)
        real = record.outputs.get(names.REAL)
        if real is None or real.probabilities is None:
            return
        sketch = self._sketch(record.deployment, real.model_key)
        pending = self._scores.get(id(sketch))
        if pending is None:
            pending = self._scores[id(sketch)] = _Pending(sketch)
        pending.add(real.probabilities, canary=False)
        canary = record.outputs.get(names.CANARY)
        if canary is not None and canary.probabilities is not None:
            pending.add(canary.probabilities, canary=True)
            if sketch.canary_model is None:
                sketch.canary_model = canary.model_key
        div = record.divergence
        sketch.add_decision(
            real_scores=None,  # counted at the flush, with the other requests' (_count_scores)
            canary_scores=None,
            js_mean=div.js_mean if div is not None else None,
            rows=len(real.probabilities),
            disagreements=div.disagreements if div is not None else None,
        )

    def _sketch(self, deployment: str, real_model: str | None) -> Sketch:
        sketch = self._open.get(deployment)
        if sketch is not None and sketch.real_model != real_model:
            self._closed.append((deployment, sketch))  # a promotion: never mix two models
            sketch = None
        if sketch is None:
            now = time.time() * 1000
            sketch = self._open[deployment] = Sketch(
                real_model=real_model, start_ms=now, end_ms=now
            )
        return sketch

    # -- flushing ---------------------------------------------------------------------------

    def _reference(self, deployment: str) -> FeatureReference | None:
        dep = self.deployments.deployments.get(deployment)
        if dep is None:
            return None
        return self._references.of(deployment, dep.feature_spec)

    def _bin(self, deployment: str, chunks: list[np.ndarray]) -> None:
        reference = self._reference(deployment)
        dep = self.deployments.deployments.get(deployment)
        if reference is None or dep is None:
            return
        matrix = np.concatenate([c for c in chunks if c.shape[1] == len(reference.names)])
        if not len(matrix):
            return
        sketch = self._open.get(deployment)
        if sketch is None:  # rows but no decision yet: file them under the current real
            sketch = self._sketch(deployment, str(dep.roles[names.REAL]))
        if sketch.feature_version not in (None, reference.version):
            return
        sketch.feature_version = reference.version
        sketch.add_features(reference.bin(matrix), len(matrix))
        sketch.add_evidence(*reference.evidence(matrix))

    def _count_scores(self) -> None:
        """Bin the answers kept since the last flush into their sketches, one numpy pass each."""
        pending, self._scores = self._scores, {}
        for answers in pending.values():
            answers.count()

    def _close_all(self) -> list[tuple[str, Sketch]]:
        self._count_scores()  # no await between: every score lands in the sketch it belongs to
        now = time.time() * 1000
        out, self._closed = self._closed, []
        for deployment, sketch in self._open.items():
            sketch.end_ms = now
            out.append((deployment, sketch))
        self._open = {}
        return [(d, s) for d, s in out if not s.empty()]

    async def flush(self) -> int:
        """Close every open sketch (binning the pending feature rows into it) and append them
        to the sketch streams. The binning is cut into slices: a second's rows binned at once
        held the event loop ~4 ms at 3,000 req/s, long enough to show in the requests' p99."""
        rows, self._rows, self._pending_rows = self._rows, {}, 0
        self._references.keep_only(self.deployments.deployments)
        for deployment, chunks in rows.items():
            for start in range(0, len(chunks), BIN_SLICE):
                self._bin(deployment, chunks[start : start + BIN_SLICE])
                await asyncio.sleep(0)  # let the requests waiting meanwhile go on
        sketches = self._close_all()
        if not sketches:
            return 0
        # One XADD a sketch, each on its own (a deployment's stream on its own node): when one
        # node fails, the others' sketches are written once, and only the failed ones are
        # kept for the next flush.
        results = await asyncio.gather(*(self._append(d, s) for d, s in sketches),
                                       return_exceptions=True)  # fmt: skip
        failed = [(sketch, r) for sketch, r in zip(sketches, results, strict=True)
                  if isinstance(r, BaseException)]  # fmt: skip
        if failed:
            self._keep_unsent([sketch for sketch, r in failed if isinstance(r, REDIS_FAILURES)])
            raise failed[0][1]
        return len(sketches)

    async def _append(self, deployment: str, sketch: Sketch) -> None:
        await self.client.xadd(
            names.drift_sketch_stream(deployment),
            {SKETCH_FIELD: sketch.to_bytes()},
            maxlen=self.maxlen,
            approximate=True,
        )

    def _keep_unsent(self, sketches: list[tuple[str, Sketch]]) -> None:
        """Sketches Redis did not take (a restart, a failover's election) go out with the next
        flush, for up to ``UNSENT_S``. A failure that hid a write (a reply lost after it)
        makes one count twice, which a window of thousands of requests absorbs."""
        oldest_ms = (time.time() - UNSENT_S) * 1000
        kept = [(d, s) for d, s in sketches if s.end_ms >= oldest_ms]
        if len(kept) < len(sketches):
            log.warning("drift: %d sketch(es) older than %.0fs dropped unsent",
                        len(sketches) - len(kept), UNSENT_S)  # fmt: skip
        self._closed = kept + self._closed

    async def run(self) -> None:
        """Flush every interval; what a Redis outage kept from being written goes out with a
        later flush (up to ``UNSENT_S``)."""
        retry_log = RetryLog(log, "drift: writing sketches")  # not four lines a second
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if await self.flush():  # nothing written (the held ones dropped): no news
                    retry_log.succeeded()
            except REDIS_FAILURES as exc:
                retry_log.failed(exc)
            except Exception:
                log.exception("drift sketch flush failed")
