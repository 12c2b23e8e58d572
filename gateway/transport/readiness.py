"""What ``/readyz`` says: whether this gateway process can answer requests now.

Ready means: this process's reply reader is reading (its reply stream's node answers: without
it no request of this process gets its answer), and every deployment's state answers and shows
a live real worker. On a Redis Cluster each of these lives on its own node, so each is read on
its own with its own bound: a shard that is down makes unready what needs it, and only that. A
load balancer then sends traffic to the gateways whose reply streams are on live nodes, while
the cluster elects a replica. The archive's state (the log bins' counters) is said but never
makes the gateway unready: requests are still answered, their entries wait in the input
stream.

A worker is live by its heartbeats, which are writes: a Redis that refuses writes for a while
(at its memory limit, or unable to write to its disk: MISCONF) refuses them too, and the
workers read as gone while they run. So a deployment with no live real worker is asked one
write that changes nothing on its own node (``ZADD XX`` of a member that is never there),
within what is left of the bound; refused, the deployment's ``error`` names why, and the log
bins' counters, which they cannot renew either, no longer read ``ok``. A ready gateway sends
no such write, and the predict path never does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from gateway.problems import RETRY, Problem
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES, refused_for_a_while

READ_TIMEOUT_S = 0.8
"""The bound of each read: a node that is away answers nothing (redis-py's cluster client retries
for seconds), and a probe must answer within the 1 s that Kubernetes gives it by default."""

PROBE_MEMBER = "readyz|write-probe"
"""The member of the write probe's ``ZADD XX``: never a worker's (``role|consumer``), so the
write adds, changes and propagates nothing, yet Redis refuses it as it refuses a heartbeat."""

LOGBIN_SILENT_S = 60.0
"""A log bin whose counters are older than this is gone (as ``/metrics`` judges it)."""


def archive_status(logbins: dict[bytes, bytes]) -> dict[str, Any]:
    """What ``/readyz`` says of the archive, from the log bins' published counters. A failing
    archive does not make the gateway unready (the requests are still answered, their entries
    wait in the input stream), but it is said, with the reason."""
    now = time.time()
    fresh = []
    for raw in logbins.values():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and now - float(doc.get("ts", 0)) < LOGBIN_SILENT_S:
            fresh.append(doc)
    failing = [d["failing"] for d in fresh if d.get("failing")]
    if failing:
        return {"status": "failing", "reason": failing[0]}
    return {"status": "ok" if fresh else "no log bin"}


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "Redis did not answer in time"
    # BUSY, OOM, MISCONF named as every other route names them ("ResponseError"; a probe)
    return refused_for_a_while(exc) or f"Redis is unavailable: {type(exc).__name__}"


async def _writes_refused(
    client: AsyncClient, deployments: list[str], timeout_s: float
) -> dict[str, str]:
    """Deployment -> why Redis refuses writes on its node now (only those that do): one write
    that changes nothing each, all at once, bounded by ``timeout_s``. Any other answer (taken,
    a timeout, a user refused the command) says nothing here: the reason stays unknown."""
    if not deployments or timeout_s <= 0:
        return {}
    answers = await asyncio.gather(
        *(
            asyncio.wait_for(
                client.zadd(names.workers_key(d), {PROBE_MEMBER: 0}, xx=True), timeout_s
            )
            for d in deployments
        ),
        return_exceptions=True,
    )
    refused = {}
    for dep, answer in zip(deployments, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, REDIS_FAILURES):
                raise answer  # a bug, not Redis
            if why := refused_for_a_while(answer):
                refused[dep] = why
    return refused


def _heartbeats_refused(why: str) -> str:
    return (f"no worker heard from, and Redis refuses writes, the workers' heartbeats "
            f"included (they may be running): {why}")  # fmt: skip


def _replies_text(failing: str) -> str:
    return f"this gateway's reply stream cannot be read: {failing}"


async def readiness(
    client: AsyncClient,
    deployments: Iterable[str],
    heartbeat_timeout_s: float,
    replies_failing: str | None,
    timeout_s: float = READ_TIMEOUT_S,
    backlogged: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """(status, body, headers) of ``/readyz``: every read at once, each bounded on its own.
    A worker is live when it was heard from within ``heartbeat_timeout_s`` by Redis's clock
    (its host's and this one's may differ). ``replies_failing``: why this process's reply
    reader fails now (None: it reads). ``backlogged``: deployment -> why its input backlog
    refuses requests now (the 503's detail), said as ``backlog`` without making the gateway
    unready: every gateway shares that backlog, and none would be left to say why."""
    started = time.monotonic()
    deps = sorted(deployments)
    reads: list[Awaitable[Any]] = [
        client.eval(*clock.live_members_args(names.workers_key(d), heartbeat_timeout_s))
        for d in deps
    ]
    reads.append(client.hgetall(names.LOGBIN_STATS))
    *live, logbins = await asyncio.gather(
        *(asyncio.wait_for(read, timeout_s) for read in reads), return_exceptions=True
    )
    for answer in (*live, logbins):
        if isinstance(answer, BaseException) and not isinstance(answer, REDIS_FAILURES):
            raise answer  # a bug, not Redis: the route's error handling says so
    if all(isinstance(answer, BaseException) for answer in (*live, logbins)):
        extra: dict[str, Any] = {"ready": False}
        if replies_failing is not None:
            extra["replies"] = _replies_text(replies_failing)
        problem = Problem(503, _failure(logbins), extra, RETRY)
        return problem.status, problem.document(), dict(problem.headers)
    checks: dict[str, Any] = {}
    for dep, members in zip(deps, live, strict=True):
        if isinstance(members, BaseException):
            checks[dep] = {"ready": False, "error": _failure(members)}
            continue
        roles: dict[str, int] = {}
        for m in members:
            role = m.decode().split("|", 1)[0]
            roles[role] = roles.get(role, 0) + 1
        checks[dep] = {"live_workers": roles, "ready": roles.get(names.REAL, 0) > 0}
    for dep, why in (backlogged or {}).items():
        if dep in checks:
            checks[dep]["backlog"] = why
    if isinstance(logbins, BaseException):
        archive = {"status": "unknown", "reason": f"the log bins' counters: {_failure(logbins)}"}
    else:
        archive = archive_status(logbins)
    silent = [dep for dep, check in checks.items() if "live_workers" in check
              and not check["ready"]]  # fmt: skip
    refused = await _writes_refused(client, silent, timeout_s - (time.monotonic() - started))
    for dep, why in refused.items():
        checks[dep]["error"] = _heartbeats_refused(why)
    if refused and archive["status"] == "ok":  # counters the log bins could not renew
        why = next(iter(refused.values()))
        archive = {"status": "unknown", "reason": f"the log bins cannot renew their counters "
                   f"while Redis refuses writes: {why}"}  # fmt: skip
    ready = bool(checks) and replies_failing is None and all(c["ready"] for c in checks.values())
    doc: dict[str, Any] = {"ready": ready, "deployments": checks, "archive": archive}
    if replies_failing is not None:
        doc["replies"] = _replies_text(replies_failing)
    return (200 if ready else 503), doc, None if ready else RETRY
