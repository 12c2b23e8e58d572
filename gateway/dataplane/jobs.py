"""Async jobs: a predict accepted now (202) and answered later, by any gateway process.

A job lives in Redis, under its deployment's hash tag, so every change to it is one script on
one node, on a single Redis as on a cluster:

- ``rdv:{dep}:job:<id>``: a hash (status, the body until it ran, the result or error after),
  expiring ``RDV_JOB_TTL_S`` after its acceptance and again after its end;
- ``rdv:{dep}:jobs``: a stream with one entry per job not yet ended, read by the consumer group
  ``gateways`` in which every gateway process is a consumer;
- ``rdv:{dep}:jobs:done``: the ids of jobs as they end (capped), what long polls wake on.

Accepting is one round trip (``JobStore.accept``: the queue bound, the caller's request id,
the hash, the stream entry), after the body passed the predict's own validation, so a bad body
is a 422 and never a job. Each gateway process runs what it reads (``JobRunner._follow``)
through ``PredictionService.predict``, the path every predict takes (every bin scores it, the
log bin archives it, a decision record is written), at most ``concurrency`` at once and never
past the process's in-flight bound, writes the answer into the hash and acks, in one script
(``JobStore.end``). A process that dies leaves its jobs pending in the group; a live one claims
them (``XAUTOCLAIM``) once idle for ``claim_idle_ms`` (never less than a job's timeout + 1 s,
so a job still running elsewhere is not taken), and runs them again: at least
once, and a claimed job whose hash says it ended is only acked. A run is started at most
``MAX_RUNS`` times.

A job's predict carries the caller's ``X-Request-Id``, else the job id, as its request id, taken
as every predict takes it (``names.request_id_key``), holding the job's id: a job tried again
finds the key its earlier try took its own, where another request with the id is a 409.
(Releasing the key before a retry lost the race to the earlier try's append when that was
still under way in a slow Redis: the job failed 409 on its own request id.)

This module is the callers' face: accept, show, wait for (long polls) and cancel a job, and
start and stop this process's share of the work. A job's Redis state and its scripts are
``job_store``'s, the reading, claiming and running ``job_runner``'s, and the ids, views and
documents they share ``job_vocabulary``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError

from gateway.dataplane.failures import Backlogged, DuplicateRequest, Overloaded, UnknownDeployment
from gateway.dataplane.job_runner import JobRunner
from gateway.dataplane.job_store import JobStore
from gateway.dataplane.job_vocabulary import (
    BACKOFF_MAX_S,
    BLOCK_MS,
    PENDING,
    Accepted,
    JobConflict,
    JobView,
)
from gateway.dataplane.service import PredictionService
from gateway.dataplane.validation import check_request_id, enriched_rows, parse_body, to_matrix
from rendezvous import names
from rendezvous.bus.connection import AsyncClient, on_key_node, text
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

RECHECK_S = 1.0
"""A long poll also reads its job this often, in case a wake-up was missed (a Redis outage)."""
WATCH_LINGER_S = 10.0
"""A deployment's done-stream reader stops after this long without a long poll to wake."""


class JobService:
    """Accepts, shows, waits for and cancels jobs, and runs this process's share of them."""

    def __init__(
        self,
        client: AsyncClient,
        blocking: AsyncClient,
        service: PredictionService,
        *,
        ttl_s: int,
        concurrency: int,
        rows_in_flight: int,
        timeout_ms: int,
        max_queued: int,
        claim_idle_ms: int,
        max_held_bytes: int,
        consumer: str | None = None,
    ):
        self.blocking = blocking
        """A client for the blocking reads (jobs and done streams), so that they hold none of
        ``client``'s connections; its timeout must outlast ``BLOCK_MS``."""
        self.service = service
        self.deployments = service.deployments
        self._stopping = asyncio.Event()
        """Set by ``stop``: the long polls answer as their jobs stand, and the runs end."""
        self._polls_ending = asyncio.Event()
        """Set by ``end_long_polls`` (the process was asked to stop): the long polls answer as
        their jobs stand, while the runs go on until ``stop``."""
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._waiting: dict[str, int] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._watch_ready: dict[str, asyncio.Event] = {}
        self.store = JobStore(
            client,
            self.deployments,
            ttl_s=ttl_s,
            max_queued=max_queued,
            max_held_bytes=max_held_bytes,
            ended=self._wake,
            request_id_ttl_ms=service.request_id_ttl_ms,
        )
        self.runner = JobRunner(
            client,
            blocking,
            service,
            self.store,
            concurrency=concurrency,
            rows_in_flight=rows_in_flight,
            timeout_ms=timeout_ms,
            claim_idle_ms=claim_idle_ms,
            consumer=consumer,
            stopping=self._stopping,
        )

    # -- accept ---------------------------------------------------------------------------------

    async def submit(self, deployment: str, raw: bytes, request_id: str | None) -> Accepted:
        """Validate the body as a predict would, check the bounds, record the job: 404, 422,
        409, 429 or 503 (the data plane's failures) before anything is written. A refusal is
        counted as a refused predict is (``rdv_requests_total``); the job's own predict is
        counted when it runs."""
        try:
            return await self._submit(deployment, raw, request_id)
        except (RequestValidationError, UnknownDeployment, DuplicateRequest, JobConflict):
            self._refused(deployment, "invalid")
            raise
        except (Overloaded, Backlogged):
            self._refused(deployment, "rejected")
            raise
        except Exception:  # Redis failed: a 503, as a predict's (the job may exist all the same)
            self._refused(deployment, "error")
            raise

    def _refused(self, deployment: str, outcome: str) -> None:
        known = deployment if deployment in self.deployments.deployments else None
        self.service.metrics.request_done(known, outcome, None)

    async def _submit(self, deployment: str, raw: bytes, request_id: str | None) -> Accepted:
        service = self.service
        dep = self.deployments.get(deployment)
        spec = dep.feature_spec
        await service.realtime_first.turn()  # the body's check: milliseconds for 1,000 rows
        body = parse_body(raw, spec, service.max_rows)
        if spec.lookup is None:
            rows = to_matrix(spec, body, service.max_rows, dep.input_rule).shape[0]
        else:  # enrichment: the caller's part now, the feature store's when the job runs
            rows = enriched_rows(spec, body, service.max_rows, dep.input_rule)[0].shape[0]
        rid = check_request_id(request_id) if request_id else None
        service.check_room(dep.name)
        return await self.store.accept(dep, raw, rid, rows)

    # -- show, wait, cancel ---------------------------------------------------------------------

    async def read(self, deployment: str, job_id: str) -> JobView:
        """The job as it stands; JobNotFound says whether it expired or never was."""
        return await self.store.read(deployment, job_id)

    async def wait(self, deployment: str, job_id: str, wait_ms: int) -> JobView:
        """The job once it ended, or as it stands after ``wait_ms``. Woken by the deployment's
        done stream, read by one task per deployment while someone waits here (a blocking
        read, no polling), and by jobs this process ends; it also reads the job every
        ``RECHECK_S`` in case a wake-up was lost."""
        view = await self.read(deployment, job_id)  # unknown, expired or ended: said at once
        if view.status != PENDING or wait_ms <= 0 or self._ending():
            return view
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        event = asyncio.Event()
        self._waiters.setdefault((deployment, job_id), set()).add(event)
        self._waiting[deployment] = self._waiting.get(deployment, 0) + 1
        try:
            await self._watch(deployment)  # reading from before our first read of the job
            while True:
                event.clear()
                view = await self.read(deployment, job_id)
                remaining = deadline - loop.time()
                if view.status != PENDING or remaining <= 0 or self._ending():
                    return view
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, RECHECK_S))
        finally:
            events = self._waiters.get((deployment, job_id), set())
            events.discard(event)
            if not events:
                self._waiters.pop((deployment, job_id), None)
            self._waiting[deployment] -= 1
            if not self._waiting[deployment]:
                del self._waiting[deployment]

    def _ending(self) -> bool:
        return self._stopping.is_set() or self._polls_ending.is_set()

    def end_long_polls(self) -> None:
        """The process was asked to stop: answer the long polls now, as their jobs stand, and
        any that comes later at once. The server waits for the requests in flight before the
        app's shutdown (``stop``) runs: a long poll held it 10 s and was then cut with a 500,
        which rdv_client's ``wait`` raised (a helper's probe)."""
        self._polls_ending.set()
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def cancel(self, deployment: str, job_id: str) -> JobView:
        """End a pending job as failed (``cancelled``); a run under way finishes, and its
        answer is dropped. JobConflict if it had already ended."""
        return await self.store.cancel(deployment, job_id)

    def _wake(self, deployment: str, job_id: str) -> None:
        for event in self._waiters.get((deployment, job_id), ()):
            event.set()

    async def _watch(self, deployment: str) -> None:
        """Make sure the deployment's done stream is read, from before now."""
        if deployment not in self._watchers:
            self._watch_ready[deployment] = asyncio.Event()
            self._watchers[deployment] = asyncio.create_task(self._read_done(deployment))
        with contextlib.suppress(TimeoutError):  # Redis down: the rechecks still see the end
            await asyncio.wait_for(self._watch_ready[deployment].wait(), 2 * RECHECK_S)

    async def _read_done(self, deployment: str) -> None:
        key = names.jobs_done_stream(deployment)
        ready = self._watch_ready[deployment]
        last: bytes | None = None
        backoff_s = 0.05
        retry_log = RetryLog(log, f"reading {key}")
        idle_since: float | None = None
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                if not self._waiting.get(deployment):
                    idle_since = idle_since or loop.time()
                    if loop.time() - idle_since > WATCH_LINGER_S:
                        return  # and nothing awaited since the check: no wake-up is lost
                else:
                    idle_since = None
                try:
                    if last is None:
                        newest: Any = await self.blocking.xrevrange(key, count=1)
                        last = newest[0][0] if newest else b"0-0"
                        ready.set()
                    reply: Any = await on_key_node(
                        self.blocking, key, "XREAD", "COUNT", 1000, "BLOCK", BLOCK_MS,
                        "STREAMS", key, last,
                    )  # fmt: skip
                    backoff_s = 0.05
                    retry_log.succeeded()
                except REDIS_FAILURES as exc:
                    ready.set()
                    retry_log.failed(exc, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    continue
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        job = fields.get(b"id") if fields else None
                        if job is not None:
                            self._wake(deployment, text(job))
        finally:
            if self._watchers.get(deployment) is asyncio.current_task():
                del self._watchers[deployment]
                del self._watch_ready[deployment]

    # -- run ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.runner.start()

    @property
    def supervisor_task(self) -> asyncio.Task[None] | None:
        """What keeps one reader per deployment, once started."""
        return self.runner.supervisor_task

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop reading; let the runs under way end within ``grace_s`` (default: the longest
        deployment timeout + 1 s, at most 10 s), cancel the rest; hand every job still pending
        on this consumer back to its stream's end for another gateway; answer the long polls
        as their jobs stand."""
        self._stopping.set()
        tasks = [*self.runner.reading_tasks, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for events in self._waiters.values():
            for event in events:
                event.set()
        await self.runner.wind_down(grace_s)


__all__ = ["RECHECK_S", "WATCH_LINGER_S", "JobService"]
