"""This gateway process's copy of every deployment's state, refreshed in the background so
that the request path never asks Redis what a deployment looks like."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.dataplane.backlog import Behind, slowest_reader
from gateway.dataplane.failures import InvalidDeploymentName, UnknownDeployment
from models.deployments import Deployment, StateReader
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.bus.connection import AsyncClient, text
from rendezvous.bus.failures import REDIS_FAILURES, said
from rendezvous.bus.redis_needs import refused_for_good
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)


class DeploymentCache:
    """Every deployment's state, refreshed from Redis in the background (one pipelined read
    a second), so the request path never asks Redis what a deployment looks like."""

    def __init__(self, client: AsyncClient, heartbeat_timeout_s: float = 5.0):
        self.client = client
        self.heartbeat_timeout_s = heartbeat_timeout_s
        """A worker heard from within this is live (as ``/readyz`` judges it)."""
        self._reader = StateReader("gateway")
        self.deployments: dict[str, Deployment] = {}
        self.backlog: dict[str, int] = {}
        """Entries in each deployment's input partitions together: trimming follows the slowest
        consumer group, so this is the backlog of the slowest reader."""
        self.backlog_bytes: dict[str, int] = {}
        """The same backlog in bytes of Redis memory (``MEMORY USAGE``, sampled)."""
        self.watch_from = (2**62, 2**62)
        """(entries, bytes): a deployment whose backlog reached either at the last refresh has
        its slowest reader read too (``behind``); the service sets half its bounds."""
        self.behind: dict[str, Behind] = {}
        """Deployment -> the reader furthest behind in its input, for those watched."""
        self.refreshes = 0
        self._lost_said = False
        self.measures_memory = True
        """False once Redis refused ``MEMORY USAGE`` (a user without it, or the command
        renamed away): ``RDV_MAX_BACKLOG_BYTES`` is then not applied, said once. The refusal
        failed every start of the gateway."""
        self._deleted: dict[str, int] = {}
        """Deleted deployments (still draining) -> the revision that deleted them: left out
        of ``deployments``, and not read again while that revision stays."""

    async def _mark_data(self, listed: Any) -> None:
        """Make the data mark; found missing after this process saw it, with no deployment
        listed, say loudly that Redis lost the system's data (workers only said their roles
        were gone, at INFO). A mark that cannot be made now (Redis full, or a replica) is made
        at a later refresh."""
        if self.refreshes and not listed and not self._lost_said:
            self._lost_said = True
            log.error("Redis has lost this system's data (restarted without persistence, or "
                      "flushed): deployments, their history, jobs, labels and drift state are "
                      "gone; the models in the data folder are indexed again at the admin "
                      "API's next look; create the deployments again (a Redis given through "
                      "RDV_REDIS_URL must persist)")  # fmt: skip
        try:
            await self.client.set(names.DATA_MARK, 1, nx=True)
        except REDIS_FAILURES as exc:
            log.debug("the data mark cannot be made now: %s", exc)

    def _without_memory_refusals(self, replies: list[Any]) -> list[Any]:
        """The replies, a refused ``MEMORY USAGE`` read as 0 (and not asked again); any other
        failure raised, as ``execute`` would."""
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                if not refused_for_good(reply):
                    raise reply
                if self.measures_memory:
                    log.warning("Redis refused MEMORY USAGE (%s): RDV_MAX_BACKLOG_BYTES is not "
                                "applied; RDV_MAX_BACKLOG still is", reply)  # fmt: skip
                self.measures_memory = False
                reply = 0
            out.append(reply)
        return out

    async def refresh(self) -> None:
        """One pipelined read of every deployment's revision and input backlog; a second
        reads the states whose revision moved (a state is ~18 kB with its feature statistics,
        so twenty deployments re-read every second cost a gateway more than all else idle)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(names.DEPLOYMENTS_SET)
        pipe.exists(names.DATA_MARK)  # a read: at its memory limit Redis refuses every SET
        listed, marked = await pipe.execute(raise_on_error=False)
        if isinstance(listed, Exception):
            raise listed
        if marked == 0:
            await self._mark_data(listed)
        elif marked == 1:
            self._lost_said = False
        self.refreshes += 1
        members = sorted(text(m) for m in listed)
        # The partitions as the last refresh saw them: the counts stay one round trip.
        streams = {m: self.deployments[m].input_streams if m in self.deployments
                   else [names.input_stream(m)] for m in members}  # fmt: skip
        pipe = self.client.pipeline(transaction=False)
        measures = self.measures_memory
        for name in members:
            pipe.get(names.revision_key(name))
            for stream in streams[name]:
                pipe.xlen(stream)
                if measures:
                    pipe.memory_usage(stream, samples=5)
                else:
                    pipe.exists(stream)  # a place holder: counts as 0 bytes
        answers, self.behind = await asyncio.gather(
            pipe.execute(raise_on_error=False), self._who_is_behind(members, streams)
        )
        replies = self._without_memory_refusals(answers)
        revisions: dict[str, Any] = {}
        at = 0
        for name in members:
            revisions[name] = replies[at]
            sizes = replies[at + 1 : at + 1 + 2 * len(streams[name])]
            at += 1 + 2 * len(streams[name])
            self.backlog[name] = sum(int(n or 0) for n in sizes[0::2])
            self.backlog_bytes[name] = sum(int(b or 0) for b in sizes[1::2]) if measures else 0
        fresh = {name: self.deployments[name] for name in members
                 if name in self.deployments and revisions[name] is not None
                 and int(revisions[name]) == self.deployments[name].revision}  # fmt: skip
        stale = [
            name
            for name in members
            if name not in fresh
            and not (
                revisions[name] is not None and self._deleted.get(name) == int(revisions[name])
            )
        ]
        self._deleted = {name: revision for name, revision in self._deleted.items()
                         if name in members and name not in stale}  # fmt: skip
        if stale:
            pipe = self.client.pipeline(transaction=False)
            for name in stale:
                pipe.get(names.deployment_key(name))
            for name, raw in zip(stale, await pipe.execute(), strict=True):
                dep = self._reader.parse(name, raw) if raw is not None else None
                if dep is None:  # none, or unreadable (said once, not at every refresh)
                    continue
                if dep.deleted_ms:  # no new request; its readers drain what it took
                    self._deleted[name] = dep.revision
                else:
                    fresh[name] = dep
        self.deployments = fresh
        for gone in set(self.backlog) - set(members):
            self.backlog.pop(gone, None)
            self.backlog_bytes.pop(gone, None)

    async def _who_is_behind(
        self, members: list[str], streams: dict[str, list[str]]
    ) -> dict[str, Behind]:
        """The reader furthest behind in each deployment whose backlog was past
        ``watch_from`` at the last refresh: its partitions' groups, its live workers and the
        log bins' counters, in a pipeline of their own beside the refresh's (the counters'
        node away on a cluster fails only this: {}). Nothing is read while every backlog is
        short."""
        entries, size = self.watch_from
        watched = [name for name in members if self.backlog.get(name, 0) >= entries
                   or self.backlog_bytes.get(name, 0) >= size]  # fmt: skip
        if not watched:
            return {}
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(names.LOGBIN_STATS)
        for name in watched:
            pipe.eval(*clock.live_members_args(names.workers_key(name), self.heartbeat_timeout_s))
            for stream in streams[name]:
                pipe.xinfo_groups(stream)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as exc:
            log.debug("who holds the backlog is not known now: %s", exc)
            return {}
        behind = {}
        logbins, at = answers[0], 1
        for name in watched:
            live, partitions = answers[at], answers[at + 1 : at + 1 + len(streams[name])]
            at += 1 + len(streams[name])
            if (reader := slowest_reader(partitions, live, logbins)) is not None:
                behind[name] = reader
        return behind

    async def run(self, interval_s: float = 1.0) -> None:
        retry_log = RetryLog(log, "deployments refresh")
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
                retry_log.succeeded()
            except REDIS_FAILURES as exc:
                retry_log.failed(said(exc))
            except Exception as exc:  # a bug must not freeze the gateway's view for good
                retry_log.failed(f"failed ({exc!r})", level=logging.ERROR, exc_info=exc)

    @property
    def draining(self) -> frozenset[str]:
        """Deleted deployments whose state stays until the log bin purges it: no new request,
        but what they accepted still ends (their jobs fail, saying so)."""
        return frozenset(self._deleted)

    def get(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            try:
                names.check_name(name, "deployment")
            except names.InvalidName as exc:
                raise InvalidDeploymentName(str(exc)) from None
            was = " (it was deleted)" if name in self._deleted else ""
            raise UnknownDeployment(f"deployment {name[:80]!r} does not exist{was}")
        return dep
