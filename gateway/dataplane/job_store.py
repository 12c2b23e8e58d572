"""A job's state in Redis and every change to it: the hash, the deployment's jobs stream and
its done stream, changed only by the scripts here, each one round trip on the node of the
deployment's hash tag. Who runs a job and who waits for it are other modules' concern."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import redis

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import (
    Backlogged,
    DuplicateRequest,
    InvalidDeploymentName,
    UnknownDeployment,
)
from gateway.dataplane.job_vocabulary import (
    FAILED,
    Accepted,
    JobConflict,
    JobNotFound,
    JobView,
    MaybeAccepted,
    compact_json,
    created_ms,
    new_job_id,
)
from models.deployments import Deployment
from rendezvous import names
from rendezvous.bus.connection import AsyncClient, text
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.routing import slot_of

DONE_MAXLEN = 10_000
"""Approximate cap of a deployment's stream of ended job ids."""

MAX_ID_SHOWN = 80
"""How much of a job id that cannot be one of ours an error repeats (a 5,000-character one
was echoed whole, twice)."""

HASH_BYTES = 300
"""What a job's hash holds beside its body or answer (its other fields, the request-id key,
Redis's own bookkeeping), counted with it against ``RDV_JOB_MAX_HELD_BYTES``."""

_ACCEPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
if #KEYS > 4 then
  local other = redis.call('GET', KEYS[5])
  if other then return {1, other} end
  if ARGV[12] == '1' or (#KEYS > 5 and redis.call('EXISTS', KEYS[6]) == 1) then return {3} end
end
local queued = redis.call('XLEN', KEYS[2])
if queued >= tonumber(ARGV[5]) then return {0, queued} end
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[10], 'LIMIT', 0, 500)
if #gone > 0 then
  local freed = 0
  for _, size in ipairs(redis.call('HMGET', KEYS[4], unpack(gone))) do
    if size then freed = freed + tonumber(size) end
  end
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('HDEL', KEYS[4], unpack(gone))
  redis.call('HINCRBY', KEYS[4], 'total', -freed)
end
local held = tonumber(redis.call('HGET', KEYS[4], 'total') or '0')
local size = #ARGV[2] + tonumber(ARGV[11])
if held > 0 and held + size > tonumber(ARGV[9]) then return {4, held} end
if #KEYS > 4 then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4]) end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'pending', 'body', ARGV[2], 'created_ms', ARGV[3],
           'ttl_s', ARGV[4], 'request_id', ARGV[6], 'entry', entry, 'body_sha', ARGV[7],
           'rows', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[10]) + 1000 * tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], size)
redis.call('HINCRBY', KEYS[4], 'total', size)
return {2}
"""
"""KEYS: job hash, jobs stream, held set, held bytes[, the job's request-id key[, the predict's
request-id key]]; ARGV: job id, body, created ms, ttl s, max queued, caller's request id or '',
the body's sha256, its rows, max held bytes, now ms, a hash's bytes beside its body, '1' if
the caller's request id was found taken on another node or under an earlier partition count.
-> {2} the job exists already: this script sent again (redis-py resends a command whose
connection dropped, after it may have run), which must not add its stream entry and bytes
twice, nor find the request id taken by itself; {1, job} the request id took that job; {3} a
predict took it (first: a retry that lost its 202 finds its job whatever the bounds); {0,
queued} queue full; {4, held} too many bytes held; {2}. Up to 500 expired jobs are taken off
the count before the bytes are checked."""

_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {0} end
if s ~= 'pending' then return {1} end
if KEYS[2] and ARGV[1] then
  local consumer, entry = string.match(ARGV[1], '^(.*):([^:]+)$')
  if entry then
    local p = redis.call('XPENDING', KEYS[2], ARGV[2], entry, entry, 1)
    if p[1] then
      if p[1][2] ~= consumer then return {3} end
      redis.call('XCLAIM', KEYS[2], ARGV[2], consumer, 0, entry, 'JUSTID')
    end
  end
end
local runs
if ARGV[1] and redis.call('HGET', KEYS[1], 'run') == ARGV[1] then
  runs = tonumber(redis.call('HGET', KEYS[1], 'runs') or '1')
else
  runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
  if ARGV[1] then redis.call('HSET', KEYS[1], 'run', ARGV[1]) end
end
local f = redis.call('HMGET', KEYS[1], 'body', 'request_id', 'rows')
return {2, runs, f[1], f[2], f[3]}
"""
"""KEYS: job hash[, jobs stream]; ARGV: the run (its consumer and entry)[, the group] -> {0}
gone; {1} ended; {3} its entry is held by another consumer now (claimed while this run's start
waited on Redis: that consumer runs it); {2, runs, body, caller's request id or ''[, rows]} (no
rows: accepted by an older gateway), the entry's idle time reset (not claimed while it runs).
A run's start sent again (its reply lost to a Redis that stalled, while the script ran or waited to)
counts once: counted at each try, a few seconds of stall failed the job as started too often."""

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
  if #KEYS > 5 then redis.call('EXPIRE', KEYS[6], ttl) end
end
-- A purged deployment's jobs stream is gone: its done stream and counts are not made again.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[3])
  if ttl then
    local size = #ARGV[6] + tonumber(ARGV[9])
    local before = tonumber(redis.call('HGET', KEYS[5], ARGV[3]) or '0')
    redis.call('ZADD', KEYS[4], tonumber(ARGV[7]) + 1000 * tonumber(ttl), ARGV[3])
    redis.call('HSET', KEYS[5], ARGV[3], size)
    redis.call('HINCRBY', KEYS[5], 'total', size - before)
  end
end
return {2, ARGV[4]}
"""
"""End a pending job: KEYS: job hash, jobs stream, done stream, held set, held bytes[, the
job's request-id key]; ARGV: stream entry ('' = the one the hash names), group, job id, status,
'result' or 'error', its JSON, now ms, done maxlen, a hash's bytes beside its JSON. The bytes
held count the JSON in place of the body, until the hash expires. The entry is acked and
deleted whatever the job's state.
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


def _may_have_run(exc: BaseException) -> bool:
    """Whether a script whose call failed so may have run all the same: its reply was lost to
    a timeout (a stalled Redis runs it on waking) or a connection dropped after it was sent;
    not a connection that was never made, nor a refusal (a loading Redis is a
    ``ConnectionError`` too)."""
    if isinstance(exc, redis.BusyLoadingError) or "connecting to" in str(exc):
        return False
    return isinstance(exc, redis.TimeoutError | redis.ConnectionError | OSError)


class JobStore:
    """Records, reads, starts, ends, cancels, drops and requeues jobs, one script each."""

    def __init__(
        self,
        client: AsyncClient,
        deployments: DeploymentCache,
        *,
        ttl_s: int,
        max_queued: int,
        max_held_bytes: int,
        ended: Callable[[str, str], None],
        request_id_ttl_ms: float = 3_600_000,
    ):
        self.client = client
        self.request_id_ttl_ms = request_id_ttl_ms
        """How long a caller's request id stays taken (``RDV_REQUEST_ID_TTL_S``)."""
        self.deployments = deployments
        self.ttl_s = ttl_s
        self.max_queued = max_queued
        self.max_held_bytes = max_held_bytes
        self._ended = ended
        """Called with (deployment, job id) for each job ended here, to wake its long polls."""

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        """One script on the node of ``keys`` (a single hash tag)."""
        client: Any = self.client
        return await client.eval(script, len(keys), *keys, *args)

    async def accept(self, dep: Deployment, raw: bytes, rid: str | None, rows: int) -> Accepted:
        """Record a job of ``dep`` whose body (of ``rows`` rows) and request id passed a
        predict's checks, in one round trip: 409 or 429 (the data plane's failures) before
        anything is written."""
        job_id = new_job_id()
        stream = names.jobs_stream(dep.name)
        keys = [names.job_key(dep.name, job_id), stream, *self._held_keys(dep.name)]
        elsewhere = False
        if rid is not None:
            keys.append(names.job_request_key(dep.name, rid))
            taken = names.request_id_key(dep.input_stream_for(rid), rid)
            apart = []  # looked at a step apart, all at once: another partition's slot...
            if slot_of(self.client, taken.encode()) == slot_of(self.client, stream.encode()):
                keys.append(taken)
            else:
                apart.append(taken)
            # ...and the counts the deployment had within the ids' TTL
            apart += dep.earlier_id_keys(rid, time.time() * 1000 - self.request_id_ttl_ms)
            found = await asyncio.gather(*(self.client.exists(k) for k in apart),
                                         return_exceptions=True)  # fmt: skip
            if apart and apart[0] == taken and isinstance(found[0], BaseException):
                raise found[0]  # the partition it goes to is away: as its predict would be
            # (an earlier count's node away: not checked)
            elsewhere = any(isinstance(n, int) and n > 0 for n in found)
            # Taken there: the script refuses it ({3}) only after it looked for a job the id
            # took, since a job's own predict takes it, and a submit sent again (its 202 lost)
            # must be told its job (409 with ``id``). Refused here before, it got a plain 409:
            # 138 of 204 sent again on a 3-partition cluster, and after a change of count every
            # one whose id had moved (a helper's probe).
        created = created_ms(job_id) or 0
        body_sha = hashlib.sha256(raw).hexdigest()
        now_ms = int(time.time() * 1000)
        try:
            reply = await self._eval(
                _ACCEPT, keys, job_id, raw, created, self.ttl_s, self.max_queued, rid or "",
                body_sha, rows, self.max_held_bytes, now_ms, HASH_BYTES, int(elsewhere),
            )  # fmt: skip
        except REDIS_FAILURES as exc:
            if not _may_have_run(exc):
                raise
            raise MaybeAccepted(
                f"Redis failed while accepting the job ({type(exc).__name__}): it may have been "
                f"accepted as job {job_id}; poll it (404 'no job': it was not) before sending the "
                "body again",
                job_id,
            ) from exc
        code = int(reply[0])
        if code == 0:
            raise Backlogged(
                f"deployment {dep.name} has {int(reply[1])} jobs accepted and not yet ended "
                f"(RDV_JOB_MAX_QUEUED={self.max_queued}); retry later"
            )
        if code == 4:
            raise Backlogged(
                f"deployment {dep.name}'s jobs hold about {int(reply[1])} bytes in Redis, bodies "
                f"waiting and answers kept for RDV_JOB_TTL_S={self.ttl_s} s "
                f"(RDV_JOB_MAX_HELD_BYTES={self.max_held_bytes}); retry later"
            )
        if code == 1:
            other = text(reply[1])
            # The first job is named only to a caller sending the same body again (a retry
            # that lost its 202): anyone else who guesses a request id must not be handed the
            # job, its result and its cancel. Its result is what that body would get anyway.
            same = await self.client.hget(names.job_key(dep.name, other), "body_sha")
            if same is None or text(same) != body_sha:
                raise DuplicateRequest(
                    f"request id {rid!r} was already used for deployment {dep.name} by a job "
                    "of another body"
                )
            raise JobConflict(
                f"request id {rid!r} was already used for deployment {dep.name} by job {other}",
                other,
            )
        if code == 3:
            assert rid is not None
            raise self._taken_by_predict(rid, dep.name)
        return Accepted(job_id, rid or job_id)

    @staticmethod
    def _held_keys(deployment: str) -> list[str]:
        return [names.jobs_held_key(deployment), names.jobs_held_bytes_key(deployment)]

    @staticmethod
    def _taken_by_predict(rid: str, deployment: str) -> DuplicateRequest:
        return DuplicateRequest(
            f"request id {rid!r} was already used for deployment {deployment} "
            "(in flight or answered on some gateway)"
        )

    # -- show, cancel ---------------------------------------------------------------------------

    def _key(self, deployment: str, job_id: str) -> str:
        try:
            names.check_name(deployment, "deployment")
        except names.InvalidName as exc:
            raise InvalidDeploymentName(str(exc)) from None
        if (
            deployment not in self.deployments.deployments
            and deployment not in self.deployments.draining  # its jobs' ends stay readable
        ):
            raise UnknownDeployment(f"deployment {deployment[:80]!r} does not exist")
        if created_ms(job_id) is None:  # no id of ours: echoed cut, as the routes' other errors
            shown = job_id[:MAX_ID_SHOWN]
            raise JobNotFound(shown, f"no job {shown!r} for deployment {deployment}", expired=False)
        return names.job_key(deployment, job_id)

    async def read(self, deployment: str, job_id: str) -> JobView:
        """The job as it stands; JobNotFound says whether it expired or never was."""
        key = self._key(deployment, job_id)
        fields: Any = await self.client.hmget(key, ["status", "result", "error", "request_id"])
        status, result, error, caller_rid = fields
        if status is None:
            raise self._missing(deployment, job_id)
        return JobView(job_id, text(status), text(caller_rid) if caller_rid else job_id,
                       result, error)  # fmt: skip

    def _missing(self, deployment: str, job_id: str) -> Exception:
        if deployment not in self.deployments.deployments:
            return UnknownDeployment(f"deployment {deployment[:80]!r} does not exist")
        born = created_ms(job_id) or 0
        if time.time() * 1000 >= born + self.ttl_s * 1000:
            return JobNotFound(
                job_id,
                f"job {job_id} of deployment {deployment} expired: jobs and their results are "
                f"kept {self.ttl_s} s (RDV_JOB_TTL_S)",
                expired=True,
            )
        return JobNotFound(job_id, f"no job {job_id} for deployment {deployment}", expired=False)

    async def cancel(self, deployment: str, job_id: str) -> JobView:
        """End a pending job as failed (``cancelled``); a run under way finishes, and its
        answer is dropped. JobConflict if it had already ended."""
        key = self._key(deployment, job_id)
        error = compact_json({"detail": "cancelled by the caller", "cancelled": True})
        caller_rid = await self.client.hget(key, "request_id")  # its key lives as long as it
        rid_key = names.job_request_key(deployment, text(caller_rid)) if caller_rid else None
        reply = await self.end(deployment, key, b"", job_id, FAILED, b"error", error, rid_key)
        code = int(reply[0])
        if code == 0:
            raise self._missing(deployment, job_id)
        if code == 1:
            status = text(reply[1])
            raise JobConflict(f"job {job_id} already ended: {status}", job_id)
        return JobView(job_id, FAILED, text(caller_rid) if caller_rid else job_id, None, error)

    # -- a run's steps --------------------------------------------------------------------------

    async def start(self, key: str, run: str, stream: str | None = None) -> Any:
        """A run starts (``_START``; ``run`` names it, so that its start counts once) -> {0}
        gone; {1} ended; {3} claimed by another consumer (with ``stream``);
        {2, runs, body, request id[, rows]}."""
        if stream is None:
            return await self._eval(_START, [key], run)
        return await self._eval(_START, [key, stream], run, names.JOBS_GROUP)

    async def end(
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
        """End a pending job (``_END``); the long polls here wake if it ended now."""
        keys = [key, names.jobs_stream(deployment), names.jobs_done_stream(deployment),
                *self._held_keys(deployment)]  # fmt: skip
        if rid_key is not None:
            keys.append(rid_key)
        now_ms = int(time.time() * 1000)
        args = (entry, names.JOBS_GROUP, job_id, status, field, doc, now_ms, DONE_MAXLEN,
                HASH_BYTES)  # fmt: skip
        reply = await self._eval(_END, keys, *args)
        if int(reply[0]) == 2:
            self._ended(deployment, job_id)
        return reply

    async def drop(self, stream: str, entry: bytes) -> None:
        """Ack and delete an entry that no run needs (``_DROP``)."""
        await self._eval(_DROP, [stream], names.JOBS_GROUP, entry)

    async def requeue(self, key: str, stream: str, entry: bytes, job_id: str) -> None:
        """``_REQUEUE``: the entry back to the stream's end, if the job still waits."""
        await self._eval(_REQUEUE, [key, stream], entry, names.JOBS_GROUP, job_id)


__all__ = ["DONE_MAXLEN", "JobStore"]
