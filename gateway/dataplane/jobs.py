"""Async jobs: a predict accepted now (202) and answered later, by any gateway process.

A job lives in Redis, under its deployment's hash tag, so every change to it is one script on
one node, on a single Redis as on a cluster:

- ``rdv:{dep}:job:<id>``: a hash (status, the body until it ran, the result or error after),
  expiring ``RDV_JOB_TTL_S`` after its acceptance and again after its end;
- ``rdv:{dep}:jobs``: a stream with one entry per job not yet ended, read by the consumer group
  ``gateways`` in which every gateway process is a consumer;
- ``rdv:{dep}:jobs:done``: the ids of jobs as they end (capped), what long polls wake on.

Accepting is one round trip (``_ACCEPT``: the queue bound, the caller's request id, the hash,
the stream entry), after the body passed the predict's own validation, so a bad body is a 422
and never a job. Each gateway process runs what it reads (``JobService._follow``) through
``PredictionService.predict``, the path every predict takes (every bin scores it, the log bin
archives it, a decision record is written), at most ``concurrency`` at once and never past the
process's in-flight bound, writes the answer into the hash and acks, in one script
(``_END``). A process that dies leaves its jobs pending in the group; a live one claims them
(``XAUTOCLAIM``) once idle for ``claim_idle_ms`` (never less than the deployment's timeout + 1 s,
so a job still running elsewhere is not taken), and runs them again: at least once, and a
claimed job whose hash says it ended is only acked. A run is started at most ``MAX_RUNS`` times.

A job's predict carries the caller's ``X-Request-Id``, else the job id, as its request id, taken
as every predict takes it (``names.request_id_key``); a job run again releases that key first,
since the lost run took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis
from fastapi.exceptions import RequestValidationError

from gateway.dataplane.failures import (
    Backlogged,
    DuplicateRequest,
    NoAnswer,
    Overloaded,
    Unavailable,
    UnknownDeployment,
    problem_of,
)
from gateway.dataplane.service import PredictionService
from gateway.dataplane.validation import check_request_id, parse_body, to_matrix
from rendezvous import names
from rendezvous.bus.connection import REDIS_FAILURES, AsyncClient, text
from rendezvous.bus.routing import slot_of

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = "pending", "done", "failed"
MAX_RUNS = 5
"""A job started this many times without an end (its gateways died or stopped under it) fails."""
DONE_MAXLEN = 10_000
"""Approximate cap of a deployment's stream of ended job ids."""
BLOCK_MS = 5000
"""How long a blocking read of the jobs or done stream waits. A new entry ends the wait at
once, so this bounds only how often an idle deployment's readers wake (each process reads every
deployment's jobs stream: twenty deployments at 1 s were 40 round trips a second on an idle
host) and how long a hung Redis goes unnoticed (the blocking client's timeout outlasts it)."""
RECHECK_S = 1.0
"""A long poll also reads its job this often, in case a wake-up was missed (a Redis outage)."""
WATCH_LINGER_S = 10.0
"""A deployment's done-stream reader stops after this long without a long poll to wake."""
READ_MAX = 16
"""Most jobs one read takes."""
CONSUMER_GC_S = 60.0
"""Consumers of the jobs group idle this long with nothing pending are removed (dead gateways)."""
BACKOFF_MAX_S = 2.0

_ACCEPT = """
local queued = redis.call('XLEN', KEYS[2])
if queued >= tonumber(ARGV[5]) then return {0, queued} end
if #KEYS > 2 then
  local other = redis.call('GET', KEYS[3])
  if other then return {1, other} end
  if #KEYS > 3 and redis.call('EXISTS', KEYS[4]) == 1 then return {3} end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[4])
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'pending', 'body', ARGV[2], 'created_ms', ARGV[3],
           'ttl_s', ARGV[4], 'request_id', ARGV[6], 'entry', entry)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {2}
"""
"""KEYS: job hash, jobs stream[, the job's request-id key[, the predict's request-id key]];
ARGV: job id, body, created ms, ttl s, max queued, caller's request id or ''.
-> {0, queued} queue full; {1, job} the request id took that job; {3} a predict took it; {2}."""

_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {0} end
if s ~= 'pending' then return {1} end
local runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
local f = redis.call('HMGET', KEYS[1], 'body', 'request_id')
return {2, runs, f[1], f[2]}
"""
"""KEYS: job hash -> {0} gone; {1} ended; {2, runs, body, caller's request id or ''}."""

_END = """
local entry = ARGV[1]
local s = redis.call('HGET', KEYS[1], 'status')
if entry == '' and s == 'pending' then entry = redis.call('HGET', KEYS[1], 'entry') or '' end
if entry ~= '' then
  redis.call('XACK', KEYS[2], ARGV[2], entry)
  redis.call('XDEL', KEYS[2], entry)
end
if not s then return {0} end
if s ~= 'pending' then return {1, s} end
redis.call('HSET', KEYS[1], 'status', ARGV[4], ARGV[5], ARGV[6], 'ended_ms', ARGV[7])
redis.call('HDEL', KEYS[1], 'body')
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
if ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
  if #KEYS > 3 then redis.call('EXPIRE', KEYS[4], ttl) end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[3])
return {2, ARGV[4]}
"""
"""End a pending job: KEYS: job hash, jobs stream, done stream[, the job's request-id key];
ARGV: stream entry ('' = the one the hash names), group, job id, status, 'result' or 'error',
its JSON, now ms, done maxlen. The entry is acked and deleted whatever the job's state.
-> {0} gone; {1, status} had already ended; {2, status} ended now."""

_DROP = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

_REQUEUE = """
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'status') == 'pending' then
  redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', KEYS[2], '*', 'id', ARGV[3]))
  return 1
end
return 0
"""
"""A job this process held when it stopped goes back to the stream's end, for any gateway."""


# -- ids ----------------------------------------------------------------------------------------


def new_job_id(now_ms: int | None = None) -> str:
    """Its creation time (epoch ms) and 80 random bits, in hex."""
    created = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{created:x}-{secrets.token_hex(10)}"


def created_ms(job_id: str) -> int | None:
    """The creation time a job id carries; None for what is no job id."""
    if not isinstance(job_id, str) or not names.JOB_ID_PATTERN.fullmatch(job_id):
        return None
    return int(job_id.split("-", 1)[0], 16)


def consumer_name() -> str:
    """This process's name in the jobs group: new at every start, so a restarted gateway's
    old jobs are claimed like a dead one's."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# -- what callers get ---------------------------------------------------------------------------


class JobNotFound(LookupError):
    def __init__(self, job_id: str, detail: str, *, expired: bool):
        super().__init__(detail)
        self.job_id = job_id
        self.expired = expired


class JobConflict(Exception):
    """The request id already took a job (``job_id``), or the job already ended."""

    def __init__(self, detail: str, job_id: str):
        super().__init__(detail)
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    request_id: str
    """The request id its predict carries: the caller's ``X-Request-Id``, else the job id."""


@dataclass(frozen=True, slots=True)
class JobView:
    id: str
    status: str
    result: bytes | None = None
    """The predict's answer as JSON, exactly as a predict would have answered it."""
    error: bytes | None = None
    """Why it failed, as JSON: ``{"status", "detail", ...}`` (the answer a predict would have
    had), or ``{"detail", "cancelled": true}``."""

    def to_json(self) -> bytes:
        head = json.dumps({"id": self.id, "status": self.status}, separators=(",", ":"))
        out = head[:-1].encode()
        if self.result is not None:
            out += b',"result":' + self.result
        if self.error is not None:
            out += b',"error":' + self.error
        return out + b"}"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def error_doc(exc: BaseException) -> bytes:
    """A run's failure as the answer its predict would have had."""
    problem = problem_of(exc)
    if problem is None:
        log.error("job failed", exc_info=exc)
        return _dumps({"status": 500, "detail": "internal server error"})
    return json.dumps(
        {"status": problem.status, "detail": problem.detail, **problem.extra},
        separators=(",", ":"),
        default=str,
    ).encode()


def answer_doc(answer: dict[str, Any]) -> tuple[str, bytes]:
    """(status, JSON) of a predict's answer; a non-finite number fails as predict's 502."""
    try:
        return DONE, _dumps(answer)
    except ValueError:
        model = answer.get("model") or {}
        detail = (
            f"model {model.get('name')} v{model.get('version')} ({model.get('role')}) answered "
            "a non-finite probability"
        )
        return FAILED, _dumps({"status": 502, "detail": detail})


def _transient(exc: BaseException) -> bool:
    """Worth running again later: this process or the bus is busy or down for a moment. A
    timeout of the models (``NoAnswer``) is the job's end."""
    if isinstance(exc, NoAnswer):
        return False
    return isinstance(exc, Overloaded | Backlogged | Unavailable | REDIS_FAILURES)


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


# -- the service --------------------------------------------------------------------------------


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
        max_queued: int,
        claim_idle_ms: int,
        consumer: str | None = None,
    ):
        self.client = client
        self.blocking = blocking
        """A client for the blocking reads (jobs and done streams), so that they hold none of
        ``client``'s connections; its timeout must outlast ``BLOCK_MS``."""
        self.service = service
        self.deployments = service.deployments
        self.ttl_s = ttl_s
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.claim_idle_ms = claim_idle_ms
        self.consumer = consumer or consumer_name()
        self._stopping = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._running: dict[str, bytes] = {}
        """Job id -> the stream entry of its run here (one run per job per process)."""
        self._taken = 0
        """Slots held: jobs running here and reads in progress, at most ``concurrency``."""
        self._reading = 0
        """Of those, the slots of reads in progress (not yet predicts in flight)."""
        self._freed = asyncio.Event()
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._waiting: dict[str, int] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._watch_ready: dict[str, asyncio.Event] = {}

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        """One script on the node of ``keys`` (a single hash tag)."""
        client: Any = self.client
        return await client.eval(script, len(keys), *keys, *args)

    # -- accept ---------------------------------------------------------------------------------

    async def submit(self, deployment: str, raw: bytes, request_id: str | None) -> Accepted:
        """Validate the body as a predict would, check the bounds, record the job: 404, 422,
        409, 429 or 503 (the data plane's failures) before anything is written."""
        service = self.service
        dep = self.deployments.get(deployment)
        to_matrix(dep.feature_spec, parse_body(raw), service.max_rows)
        rid = check_request_id(request_id) if request_id else None
        service.check_room(dep.name)
        job_id = new_job_id()
        stream = names.jobs_stream(dep.name)
        keys = [names.job_key(dep.name, job_id), stream]
        if rid is not None:
            keys.append(names.job_request_key(dep.name, rid))
            taken = names.request_id_key(dep.input_stream_for(rid), rid)
            if slot_of(self.client, taken.encode()) == slot_of(self.client, stream.encode()):
                keys.append(taken)
            elif await self.client.exists(taken):  # another partition's slot: a step apart
                raise self._taken_by_predict(rid, dep.name)
        created = created_ms(job_id) or 0
        reply = await self._eval(
            _ACCEPT, keys, job_id, raw, created, self.ttl_s, self.max_queued, rid or ""
        )
        code = int(reply[0])
        if code == 0:
            raise Backlogged(
                f"deployment {dep.name} has {int(reply[1])} jobs accepted and not yet ended "
                f"(RDV_JOB_MAX_QUEUED={self.max_queued}); retry later"
            )
        if code == 1:
            other = text(reply[1])
            raise JobConflict(
                f"request id {rid!r} was already used for deployment {dep.name} by job {other}",
                other,
            )
        if code == 3:
            assert rid is not None
            raise self._taken_by_predict(rid, dep.name)
        return Accepted(job_id, rid or job_id)

    @staticmethod
    def _taken_by_predict(rid: str, deployment: str) -> DuplicateRequest:
        return DuplicateRequest(
            f"request id {rid!r} was already used for deployment {deployment} "
            "(in flight or answered on some gateway)"
        )

    # -- show, wait, cancel ---------------------------------------------------------------------

    def _key(self, deployment: str, job_id: str) -> str:
        if not isinstance(deployment, str) or not names.NAME_PATTERN.fullmatch(deployment):
            raise UnknownDeployment(f"deployment {deployment!r} does not exist")
        if created_ms(job_id) is None:
            raise JobNotFound(
                job_id, f"no job {job_id!r} for deployment {deployment}", expired=False
            )
        return names.job_key(deployment, job_id)

    async def read(self, deployment: str, job_id: str) -> JobView:
        """The job as it stands; JobNotFound says whether it expired or never was."""
        key = self._key(deployment, job_id)
        fields: Any = await self.client.hmget(key, ["status", "result", "error"])
        status, result, error = fields
        if status is None:
            raise self._missing(deployment, job_id)
        return JobView(job_id, text(status), result, error)

    def _missing(self, deployment: str, job_id: str) -> Exception:
        if deployment not in self.deployments.deployments:
            return UnknownDeployment(f"deployment {deployment!r} does not exist")
        born = created_ms(job_id) or 0
        if time.time() * 1000 >= born + self.ttl_s * 1000:
            return JobNotFound(
                job_id,
                f"job {job_id} of deployment {deployment} expired: jobs and their results are "
                f"kept {self.ttl_s} s (RDV_JOB_TTL_S)",
                expired=True,
            )
        return JobNotFound(job_id, f"no job {job_id} for deployment {deployment}", expired=False)

    async def wait(self, deployment: str, job_id: str, wait_ms: int) -> JobView:
        """The job once it ended, or as it stands after ``wait_ms``. Woken by the deployment's
        done stream, read by one task per deployment while someone waits here (a blocking
        read, no polling), and by jobs this process ends; it also reads the job every
        ``RECHECK_S`` in case a wake-up was lost."""
        view = await self.read(deployment, job_id)  # unknown, expired or ended: said at once
        if view.status != PENDING or wait_ms <= 0 or self._stopping.is_set():
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
                if view.status != PENDING or remaining <= 0 or self._stopping.is_set():
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

    async def cancel(self, deployment: str, job_id: str) -> JobView:
        """End a pending job as failed (``cancelled``); a run under way finishes, and its
        answer is dropped. JobConflict if it had already ended."""
        key = self._key(deployment, job_id)
        error = _dumps({"detail": "cancelled by the caller", "cancelled": True})
        caller_rid = await self.client.hget(key, "request_id")  # its key lives as long as it
        rid_key = names.job_request_key(deployment, text(caller_rid)) if caller_rid else None
        reply = await self._end(deployment, key, b"", job_id, FAILED, b"error", error, rid_key)
        code = int(reply[0])
        if code == 0:
            raise self._missing(deployment, job_id)
        if code == 1:
            status = text(reply[1])
            raise JobConflict(f"job {job_id} already ended: {status}", job_id)
        return JobView(job_id, FAILED, None, error)

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
                    reply: Any = await self.blocking.xread({key: last}, count=1000, block=BLOCK_MS)
                    backoff_s = 0.05
                except REDIS_FAILURES as exc:
                    ready.set()
                    log.warning("cannot read %s (%s); retrying in %.2fs", key, exc, backoff_s)
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
        self._supervisor = asyncio.create_task(self._supervise())

    @property
    def supervisor_task(self) -> asyncio.Task[None] | None:
        """What keeps one reader per deployment, once started."""
        return self._supervisor

    async def _supervise(self, interval_s: float = 1.0) -> None:
        """One reader per deployment, following the deployment cache."""
        while True:
            wanted = set(self.deployments.deployments)
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

    def _room(self) -> int:
        """Slots a read may take now: within ``concurrency`` and the in-flight bound."""
        service = self.service
        in_flight_room = service.max_in_flight - service.in_flight - self._reading
        return min(self.concurrency - self._taken, in_flight_room)

    async def _reserve(self) -> int:
        while True:
            room = self._room()
            if room > 0:
                fair = max(1, self.concurrency // max(1, len(self._readers)))
                n = min(room, READ_MAX, fair)
                self._taken += n
                self._reading += n
                return n
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), 0.05)

    def _release(self, n: int, *, reading: bool) -> None:
        self._taken -= n
        if reading:
            self._reading -= n
        self._freed.set()

    def _claim_idle_ms(self, deployment: str) -> int:
        dep = self.deployments.deployments.get(deployment)
        timeout_ms = dep.schedule.timeout_ms if dep is not None else 0
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
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
                        await self.client.xgroup_create(
                            stream, names.JOBS_GROUP, "0", mkstream=True
                        )
                    group_ready = True
                n = await self._reserve()
                entries: list[tuple[bytes, str | None]] = []
                try:
                    if loop.time() >= next_claim:
                        entries, cursor = await self._claim(deployment, stream, n, cursor)
                        if cursor == b"0-0":
                            next_claim = loop.time() + self._claim_idle_ms(deployment) / 2000
                    if not entries:  # block no longer than until the next claim is due
                        block_ms = min(BLOCK_MS, int((next_claim - loop.time()) * 1000))
                        entries = await self._read(stream, n, max(block_ms, 1))
                finally:
                    self._release(n - len(entries), reading=True)
                for entry_id, job_id in entries:
                    self._reading -= 1  # the slot now belongs to a run
                    task = asyncio.create_task(self._run(deployment, entry_id, job_id))
                    self._runs.add(task)
                    task.add_done_callback(self._runs.discard)
                if loop.time() >= next_gc:
                    next_gc = loop.time() + CONSUMER_GC_S
                    await self._forget_dead_consumers(stream)
                backoff_s = 0.05
            except REDIS_FAILURES as exc:
                if _is_nogroup(exc):
                    group_ready = False  # Redis lost it (restarted without its data)
                else:
                    log.warning("jobs of %s: %s; retrying in %.2fs", deployment, exc, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _read(self, stream: str, n: int, block_ms: int) -> list[tuple[bytes, str | None]]:
        reply: Any = await self.blocking.xreadgroup(
            names.JOBS_GROUP, self.consumer, {stream: ">"}, count=n, block=block_ms
        )
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
            log.info("jobs of %s: claimed %d from dead gateways", deployment, len(found))
        return found, reply[0]

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Consumers of gateways long gone, with nothing pending (their jobs were claimed)."""
        for info in await self.client.xinfo_consumers(stream, names.JOBS_GROUP):
            name = text(info["name"])
            if (
                name != self.consumer
                and not info["pending"]
                and info["idle"] > CONSUMER_GC_S * 1000
            ):
                await self.client.xgroup_delconsumer(stream, names.JOBS_GROUP, name)

    async def _run(self, deployment: str, entry: bytes, job_id: str | None) -> None:
        """One run of one job, holding one slot: start it (unless it ended, expired or runs
        here already), predict, end it. A refusal that passes (busy, Redis down) is retried
        while the job lives; a stop leaves it pending, for ``stop`` to hand back."""
        stream = names.jobs_stream(deployment)
        try:
            if job_id is not None and self._running.get(job_id) == entry:
                return  # our own run's entry, claimed back: that run acks it
            if job_id is None or created_ms(job_id) is None or job_id in self._running:
                await self._drop(stream, entry)  # not a job, or a second entry of one
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
            self._release(1, reading=False)

    async def _run_job(self, deployment: str, entry: bytes, job_id: str) -> None:
        key = names.job_key(deployment, job_id)
        stream = names.jobs_stream(deployment)
        reply = await self._eval(_START, [key])
        if int(reply[0]) != 2:  # expired, cancelled or already ended elsewhere
            await self._drop(stream, entry)
            return
        runs, body, caller_rid = int(reply[1]), reply[2], text(reply[3] or b"")
        request_id = caller_rid or job_id
        rid_key = names.job_request_key(deployment, caller_rid) if caller_rid else None
        if runs > MAX_RUNS:
            error = _dumps({"status": 500, "detail": f"the job was started {MAX_RUNS} times "
                            "without an end: the gateways running it stopped or died"})  # fmt: skip
            await self._end_surely(deployment, key, entry, job_id, FAILED, b"error", error, rid_key)
            return
        backoff_s = 0.1
        tries = 0
        while True:
            tries += 1
            if runs > 1 or tries > 1:
                await self._release_request_id(deployment, request_id)
            try:
                answer = await self.service.predict(deployment, body, request_id)
            except (RequestValidationError, UnknownDeployment, DuplicateRequest, NoAnswer) as exc:
                status, field, doc = FAILED, b"error", error_doc(exc)
            except Exception as exc:
                if not _transient(exc):
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
                        await self._drop(stream, entry)
                        return
                    continue
            else:
                status, doc = answer_doc(answer)
                field = b"result" if status == DONE else b"error"
            break
        await self._end_surely(deployment, key, entry, job_id, status, field, doc, rid_key)

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

    async def _release_request_id(self, deployment: str, request_id: str) -> None:
        """A run before this one (lost, or refused for a moment) may have taken the request
        id; this run is the same request."""
        dep = self.deployments.deployments.get(deployment)
        if dep is not None:
            await self.client.delete(names.request_id_key(dep.input_stream_for(request_id),
                                                          request_id))  # fmt: skip

    async def _end(
        self,
        deployment: str,
        key: str,
        entry: bytes,
        job_id: str,
        status: str,
        field: bytes,
        doc: bytes,
        rid_key: str | None = None,
    ) -> Any:
        keys = [key, names.jobs_stream(deployment), names.jobs_done_stream(deployment)]
        if rid_key is not None:
            keys.append(rid_key)
        now_ms = int(time.time() * 1000)
        args = (entry, names.JOBS_GROUP, job_id, status, field, doc, now_ms, DONE_MAXLEN)
        reply = await self._eval(_END, keys, *args)
        if int(reply[0]) == 2:
            self._wake(deployment, job_id)
        return reply

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
                await self._end(deployment, key, entry, job_id, status, field, doc, rid_key)
                return
            except REDIS_FAILURES as exc:
                if self._stopping.is_set():
                    raise
                log.warning("job %s: cannot write its end (%s); retrying", job_id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _drop(self, stream: str, entry: bytes) -> None:
        await self._eval(_DROP, [stream], names.JOBS_GROUP, entry)

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop reading; let the runs under way end within ``grace_s`` (default: the longest
        deployment timeout + 1 s, at most 10 s), cancel the rest; hand every job still pending
        on this consumer back to its stream's end for another gateway; answer the long polls
        as their jobs stand."""
        self._stopping.set()
        tasks = [t for t in (self._supervisor, *self._readers.values(), *self._watchers.values())
                 if t is not None]  # fmt: skip
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for events in self._waiters.values():
            for event in events:
                event.set()
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
                await self._drop(stream, entry)
                continue
            key = names.job_key(deployment, job_id)
            await self._eval(_REQUEUE, [key, stream], entry, names.JOBS_GROUP, job_id)
        if len(held) < 1000:
            await self.client.xgroup_delconsumer(stream, names.JOBS_GROUP, self.consumer)


def _job_of(fields: Any) -> str | None:
    job = fields.get(b"id") if isinstance(fields, dict) else None
    return text(job) if job is not None else None


__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "Accepted",
    "JobConflict",
    "JobNotFound",
    "JobService",
    "JobView",
    "created_ms",
    "new_job_id",
]
