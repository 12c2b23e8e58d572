"""This process's share of the job work: a reader per deployment in the jobs group, claiming
what dead gateways left, a run per job through the predict path within this process's slots,
its end written, and at a stop the jobs held here handed back to their streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

import redis
from fastapi.exceptions import RequestValidationError

from gateway.dataplane.failures import (
    DuplicateRequest,
    NoAnswer,
    UnknownDeployment,
    passing,
)
from gateway.dataplane.job_slots import JobSlots
from gateway.dataplane.job_store import JobStore
from gateway.dataplane.job_vocabulary import (
    BACKOFF_MAX_S,
    BLOCK_MS,
    DONE,
    FAILED,
    PENDING,
    answer_doc,
    compact_json,
    created_ms,
    error_doc,
)
from gateway.dataplane.service import PredictionService
from rendezvous import names
from rendezvous.bus.connection import AsyncClient, on_key_node, text
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.retention import FORGET_GONE_CONSUMERS
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

MAX_RUNS = 5
"""A job started this many times without an end (its gateways died or stopped under it) fails."""
SHARED_BLOCK_MS = 100
"""Longest blocking read while another deployment's reader waits for a slot: a slot held by a
read of an idle stream is one a busy deployment cannot use."""
CONSUMER_GC_S = 60.0
"""Consumers of the jobs group idle this long with nothing pending are removed (dead gateways)."""


def consumer_name() -> str:
    """This process's name in the jobs group: new at every start, so a restarted gateway's
    old jobs are claimed like a dead one's."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


def _job_of(fields: Any) -> str | None:
    job = fields.get(b"id") if isinstance(fields, dict) else None
    return text(job) if job is not None else None


class JobRunner:
    """Reads, claims and runs this process's share of every deployment's jobs."""

    def __init__(
        self,
        client: AsyncClient,
        blocking: AsyncClient,
        service: PredictionService,
        store: JobStore,
        *,
        concurrency: int,
        rows_in_flight: int,
        timeout_ms: int,
        claim_idle_ms: int,
        consumer: str | None,
        stopping: asyncio.Event,
    ):
        self.client = client
        self.blocking = blocking
        """The client of the blocking reads of the jobs streams; its timeout must outlast
        ``BLOCK_MS``."""
        self.service = service
        self.deployments = service.deployments
        self.store = store
        self.timeout_ms = timeout_ms
        """How long a job's predict waits for the models (the deployment's own timeout when
        longer): no caller waits on the line, so a busy model queues a job, not fails it."""
        self.claim_idle_ms = claim_idle_ms
        self.consumer = consumer or consumer_name()
        self._stopping = stopping
        """Set by the job service's stop: reads, runs and retries end."""
        self._supervisor: asyncio.Task[None] | None = None
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._running: dict[str, bytes] = {}
        """Job id -> the stream entry of its run here (one run per job per process)."""
        self.slots = JobSlots(concurrency, service, rows_in_flight)
        # One log for all of this process's runs: a line per job per try (every 2 s each, up
        # to ``concurrency`` jobs) was ~2,700 lines a minute from two processes while Redis
        # sat at its memory limit with 300 jobs queued (a helper's outage probe).
        self._start_log = RetryLog(log, "job runs: cannot start them")
        self._end_log = RetryLog(log, "job runs: cannot write their ends")

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise())

    @property
    def supervisor_task(self) -> asyncio.Task[None] | None:
        """What keeps one reader per deployment, once started."""
        return self._supervisor

    @property
    def reading_tasks(self) -> list[asyncio.Task[None]]:
        """The supervisor and the readers: what a stop cancels first."""
        return [t for t in (self._supervisor, *self._readers.values()) if t is not None]

    async def _supervise(self, interval_s: float = 1.0) -> None:
        """One reader per deployment, following the deployment cache."""
        while True:
            # A deleted deployment's reader stays until the purge: its queued jobs fail,
            # saying it was deleted, instead of waiting for ever.
            wanted = set(self.deployments.deployments) | self.deployments.draining
            for name, task in list(self._readers.items()):
                if task.done():  # a bug ended it: said, and started again
                    if not task.cancelled() and task.exception() is not None:
                        log.error("jobs reader of %s failed", name, exc_info=task.exception())
                    del self._readers[name]
            for name in wanted - set(self._readers):
                self._readers[name] = asyncio.create_task(self._follow(name))
            for name in set(self._readers) - wanted:
                self._readers.pop(name).cancel()
            await asyncio.sleep(interval_s)

    def _claim_idle_ms(self, deployment: str) -> int:
        dep = self.deployments.deployments.get(deployment)
        timeout_ms = max(dep.schedule.timeout_ms if dep is not None else 0, self.timeout_ms)
        return max(self.claim_idle_ms, int(timeout_ms) + 1000)

    async def _follow(self, deployment: str) -> None:
        """Read the deployment's jobs stream as this process's consumer, claim what dead
        consumers left, and start a run per job, within the slots."""
        stream = names.jobs_stream(deployment)
        loop = asyncio.get_running_loop()
        group_ready = False
        next_claim = 0.0
        next_gc = loop.time() + CONSUMER_GC_S
        cursor = b"0-0"
        backoff_s = 0.05
        retry_log = RetryLog(log, f"jobs of {deployment}")
        idle = False
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    # Only a live deployment's stream is made: one draining, or gone from the
                    # cache (purged a moment ago: its group's loss woke this reader), was made
                    # again empty, for good (found by a helper's churn probe).
                    live = deployment in self.deployments.deployments
                    try:
                        await self.client.xgroup_create(
                            stream, names.JOBS_GROUP, "0", mkstream=live
                        )
                    except redis.ResponseError as exc:  # BUSYGROUP: it exists
                        if not live and "BUSYGROUP" not in str(exc):
                            return  # purged: nothing of it is made again
                    group_ready = True
                n = await self.slots.reserve(readers=len(self._readers), idle=idle)
                entries: list[tuple[bytes, str | None]] = []
                try:
                    if loop.time() >= next_claim:
                        entries, cursor = await self._claim(deployment, stream, n, cursor)
                        if cursor == b"0-0":
                            next_claim = loop.time() + self._claim_idle_ms(deployment) / 2000
                    if not entries:  # block no longer than until the next claim is due
                        block_ms = min(BLOCK_MS, int((next_claim - loop.time()) * 1000))
                        if self.slots.contended:  # others wait for the slot this read holds
                            block_ms = min(block_ms, SHARED_BLOCK_MS)
                        entries = await self._read(stream, n, max(block_ms, 1))
                finally:
                    self.slots.release(n - len(entries), reading=True)
                idle = not entries
                for entry_id, job_id in entries:
                    self.slots.to_run()
                    task = asyncio.create_task(self._run(deployment, entry_id, job_id))
                    self._runs.add(task)
                    task.add_done_callback(self._runs.discard)
                if loop.time() >= next_gc:
                    next_gc = loop.time() + CONSUMER_GC_S
                    await self._forget_dead_consumers(stream)
                backoff_s = 0.05
                retry_log.succeeded()
            except REDIS_FAILURES as exc:
                if _is_nogroup(exc):
                    group_ready = False  # Redis lost it (restarted without its data), or purged
                else:
                    retry_log.failed(exc, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _read(self, stream: str, n: int, block_ms: int) -> list[tuple[bytes, str | None]]:
        reply: Any = await on_key_node(
            self.blocking, stream, "XREADGROUP", "GROUP", names.JOBS_GROUP, self.consumer,
            "COUNT", n, "BLOCK", block_ms, "STREAMS", stream, ">",
        )  # fmt: skip
        return [
            (entry_id, _job_of(fields)) for _s, found in reply or () for entry_id, fields in found
        ]

    async def _claim(
        self, deployment: str, stream: str, n: int, cursor: bytes
    ) -> tuple[list[tuple[bytes, str | None]], bytes]:
        reply = await self.client.xautoclaim(
            stream,
            names.JOBS_GROUP,
            self.consumer,
            min_idle_time=self._claim_idle_ms(deployment),
            start_id=cursor,
            count=n,
        )
        found = [(item[0], _job_of(item[1])) for item in reply[1] if item and item[0]]
        if found:
            idle_s = self._claim_idle_ms(deployment) / 1000
            log.info("jobs of %s: claimed %d idle over %.0f s (their gateway dead, or cut off "
                     "from Redis)", deployment, len(found), idle_s)  # fmt: skip
        return found, reply[0]

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Consumers of gateways long gone, with nothing pending (their jobs were claimed);
        one script, so a job read between the look and the removal cannot lose its owner."""
        gone_ms = int(CONSUMER_GC_S * 1000)
        await self.client.eval(FORGET_GONE_CONSUMERS, 1, stream, gone_ms, self.consumer)  # type: ignore[arg-type,misc]

    async def _run(self, deployment: str, entry: bytes, job_id: str | None) -> None:
        """One run of one job, holding one slot: start it (unless it ended, expired or runs
        here already), predict, end it. A refusal that passes (busy, Redis down) is retried
        while the job lives; a stop leaves it pending, for ``stop`` to hand back."""
        stream = names.jobs_stream(deployment)
        try:
            if job_id is not None and self._running.get(job_id) == entry:
                return  # our own run's entry, claimed back: that run acks it
            if job_id is None or created_ms(job_id) is None or job_id in self._running:
                await self.store.drop(stream, entry)  # not a job, or a second entry of one
                return
            self._running[job_id] = entry
            try:
                await self._run_job(deployment, entry, job_id)
            finally:
                del self._running[job_id]
        except asyncio.CancelledError:
            raise
        except REDIS_FAILURES as exc:  # left pending: claimed again once idle
            log.warning("job %s of %s: %s; left to be claimed", job_id, deployment, exc)
        except Exception:
            log.exception("job %s of %s failed", job_id, deployment)
        finally:
            self.slots.release(1, reading=False)

    async def _run_job(self, deployment: str, entry: bytes, job_id: str) -> None:
        key = names.job_key(deployment, job_id)
        stream = names.jobs_stream(deployment)
        reply = await self._start_surely(key, f"{self.consumer}:{text(entry)}", stream)
        if reply is None:  # stopping: left pending, for the stop to hand back
            return
        if int(reply[0]) == 3:  # another gateway claimed it while the start waited: its run
            return
        if int(reply[0]) != 2:  # expired, cancelled or already ended elsewhere
            await self.store.drop(stream, entry)
            return
        runs, body, caller_rid = int(reply[1]), reply[2], text(reply[3] or b"")
        # Accepted by an older gateway without its row count: weighed as the largest.
        rows = int(reply[4]) if len(reply) > 4 and reply[4] else self.service.max_rows
        request_id = caller_rid or job_id
        rid_key = names.job_request_key(deployment, caller_rid) if caller_rid else None
        if runs > MAX_RUNS:
            detail = (
                f"the job was started {MAX_RUNS} times without an end: the gateways running it "
                "stopped or died"
            )
            error = compact_json({"status": 500, "detail": detail})
            await self._end_surely(deployment, key, entry, job_id, FAILED, b"error", error, rid_key)
            return
        backoff_s = 0.1
        while True:
            try:
                async with self.slots.rows.held(rows):
                    answer = await self.service.predict(  # its earlier tries hold the id
                        deployment, body, request_id, patience_ms=self.timeout_ms, job=job_id
                    )
            except (RequestValidationError, UnknownDeployment, DuplicateRequest, NoAnswer) as exc:
                status, field, doc = FAILED, b"error", error_doc(exc)
            except Exception as exc:
                if not passing(exc):
                    status, field, doc = FAILED, b"error", error_doc(exc)
                else:
                    # Busy or Redis down: again after a pause, still holding the entry (the
                    # claim resets its idle time) unless the job ended meanwhile.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff_s)
                    if self._stopping.is_set():
                        return
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    if not await self._still_pending(stream, key, entry):
                        await self.store.drop(stream, entry)
                        return
                    continue
            else:
                await self.service.realtime_first.turn()  # the answer's JSON
                status, doc = answer_doc(answer)
                field = b"result" if status == DONE else b"error"
            break
        await self._end_surely(deployment, key, entry, job_id, status, field, doc, rid_key)

    async def _start_surely(self, key: str, run: str, stream: str | None = None) -> Any:
        """The run's start, riding out Redis failures until it is written or a stop (None).
        Left to be claimed instead, a job read just before a 2 s stall stayed pending for the
        30 s of ``RDV_JOB_CLAIM_IDLE_MS`` (found by a flaky test)."""
        backoff_s = 0.05
        while True:
            try:
                reply = await self.store.start(key, run, stream)
            except REDIS_FAILURES as exc:
                self._start_log.failed(exc, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                if self._stopping.is_set():
                    return None
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
            else:
                self._start_log.succeeded()
                return reply

    async def _still_pending(self, stream: str, key: str, entry: bytes) -> bool:
        """Whether the job still waits for this run (Redis down: assume so), resetting the
        entry's idle time so that no other gateway claims it meanwhile."""
        try:
            await self.client.xclaim(
                stream, names.JOBS_GROUP, self.consumer, 0, [entry], justid=True
            )
            status = await self.client.hget(key, "status")
        except REDIS_FAILURES:
            return True
        return status is not None and text(status) == PENDING

    async def _end_surely(
        self,
        deployment: str,
        key: str,
        entry: bytes,
        job_id: str,
        status: str,
        field: bytes,
        doc: bytes,
        rid_key: str | None,
    ) -> None:
        """Write the end, riding out Redis failures until it is written or a stop (then the
        job stays pending, to be run again: at least once)."""
        backoff_s = 0.05
        while True:
            try:
                await self.store.end(deployment, key, entry, job_id, status, field, doc, rid_key)
                self._end_log.succeeded()
                return
            except REDIS_FAILURES as exc:
                if self._stopping.is_set():
                    raise
                self._end_log.failed(exc, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def wind_down(self, grace_s: float | None = None) -> None:
        """Once the reading stopped: let the runs under way end within ``grace_s`` (default:
        the longest deployment timeout + 1 s, at most 10 s), cancel the rest, and hand every
        job still pending on this consumer back to its stream's end for another gateway."""
        if grace_s is None:
            timeouts = [d.schedule.timeout_ms for d in self.deployments.deployments.values()]
            grace_s = min(10.0, max(timeouts, default=1000.0) / 1000 + 1.0)
        if self._runs:
            _, late = await asyncio.wait(set(self._runs), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for deployment in list(self._readers):
            try:
                await asyncio.wait_for(self._hand_back(deployment), 2.0)
            except REDIS_FAILURES as exc:  # a timeout too (an OSError)
                log.warning("jobs of %s held here are left to be claimed: %s", deployment, exc)

    async def _hand_back(self, deployment: str) -> None:
        stream = names.jobs_stream(deployment)
        held: Any = await self.client.xpending_range(
            stream, names.JOBS_GROUP, "-", "+", 1000, consumername=self.consumer
        )
        for item in held:
            entry = item["message_id"]
            found: Any = await self.client.xrange(stream, entry, entry)
            job_id = _job_of(found[0][1]) if found else None
            if job_id is None or created_ms(job_id) is None:
                await self.store.drop(stream, entry)
                continue
            key = names.job_key(deployment, job_id)
            await self.store.requeue(key, stream, entry, job_id)
        if len(held) < 1000:
            await self.client.xgroup_delconsumer(stream, names.JOBS_GROUP, self.consumer)


__all__ = ["CONSUMER_GC_S", "MAX_RUNS", "JobRunner", "consumer_name"]
