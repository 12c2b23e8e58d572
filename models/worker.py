"""The model worker: one role of one deployment (a process of its own, or a thread of a worker
host), or several shadow roles of one deployment together (``serve_roles``).

It reads a batch of envelopes per XREADGROUP (one per role's group, in one round trip), runs
onnxruntime once per role for the whole batch, and writes every result to its request's reply
stream together with the acks in one pipelined write, which goes ahead of its next read in
that read's round trip. Entries past their deadline are acked and counted, never scored late.

Only real (and a challenger with an A/B split) answers callers. Every other role (the canary,
shadow challengers) only has to reach the decision record within the grace period, so after a
short read it waits a few milliseconds before reading again: at moderate load one wake-up,
one onnxruntime call and one write round trip then serve many requests instead of one each,
and the CPU they would burn stays with the critical path.

The reading (own pending entries first, XAUTOCLAIM of a dead worker's, backoff, stop) is the
shared ``ConsumerLoop``; a worker adds the model, its write (results, acks and heartbeat
together, ahead of the next read) and the deployment's revision, read in the same round trip as
each batch.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping

import redis

from models.deployment_store import DeploymentStore, ensure_groups
from models.deployments import (
    Deployment,
    DeploymentNotFound,
    DeploymentUnreadable,
    ModelRef,
    StateReader,
)
from models.registry import ModelRegistry
from models.role_model import SHADOW_BATCH_WAIT_MS, RoleModel, Scored, WorkerStats, batch_wait_s
from models.runtime import OnnxClassifier, RunLimit
from models.worker_triage import triage
from models.worker_writes import check_written, reply_commands
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.bus.connection import Client
from rendezvous.bus.consumer import Batch, ConsumerLoop, Entry, Membership
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.routing import command
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

NOT_NOW: tuple[type[Exception], ...] = (*REDIS_FAILURES, DeploymentUnreadable)
"""What stops a consumer group being made again for now: Redis, or a state a newer version
wrote (it let the worker's loop end)."""

MODEL_RUN_LIMIT_S = 30.0
"""Longest one model run may take before it is stopped (``RDV_MODEL_RUN_LIMIT_S``)."""
RELOAD_RETRY_S = 5.0
"""A role's model that would not load is tried again this often."""
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
"""The backoff of a role beside the first whose model cannot load."""

__all__ = ["SHADOW_BATCH_WAIT_MS", "ModelWorker", "WorkerStats", "batch_wait_s"]


class ModelWorker(ConsumerLoop):
    """Serves ``role`` of ``deployment`` and, once asked (``serve_roles``), other roles of it
    beside it: each in its own group, all read, decoded and answered in the same round trips."""

    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        *,
        deployment: str,
        role: str,
        consumer: str,
        batch_size: int = 64,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        reply_maxlen: int = 10_000,
        heartbeat_s: float = 1.0,
        shadow_batch_wait_ms: float = SHADOW_BATCH_WAIT_MS,
        model_run_limit_s: float = MODEL_RUN_LIMIT_S,
        timeout_s: float | None = None,
    ):
        """``timeout_s``: the client's socket timeout, which bounds every command (a blocking
        read by that beyond its block), so a Redis that stops answering is a failure the
        loop rides out, not a read that waits for ever."""
        self.deployment = names.check_name(deployment, "deployment")
        self._states = StateReader(f"worker {deployment}")
        self.run_limit = RunLimit.shared(model_run_limit_s)
        first = RoleModel(registry, self.deployment, role, consumer, shadow_batch_wait_ms,
                          self.run_limit)  # fmt: skip
        self.stream = names.input_stream(deployment)
        self.redis_clock = clock.RedisClock()
        revision_key = names.revision_key(self.deployment).encode()
        # Both round trips of a batch go through the loop's router (see
        # ``rendezvous.bus.blocking_router``): redis-py's command layer cost more than the model.
        super().__init__(
            client,
            group=first.member.group,
            consumer=consumer,
            batch_size=batch_size,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            heartbeat_s=heartbeat_s,
            read_along=[command(b"GET", revision_key), clock.time_command(revision_key)],
            member=first.member,
            timeout_s=timeout_s,
        )
        self.first = first
        """The role this worker was made for: it serves as long as the worker runs."""
        self.roles: dict[str, RoleModel] = {first.role: first}
        self._by_member: dict[int, RoleModel] = {id(first.member): first}
        self._wanted: dict[str, str] | None = None
        self._wanted_lock = threading.Lock()
        self._broken: dict[str, tuple[float, float]] = {}
        """Roles whose model could not load -> (monotonic time of the next try, backoff)."""
        self.load_failures = 0
        """Roles asked of ``serve_roles`` whose model could not load, counted at each try."""
        self.registry = registry
        self.store = DeploymentStore(client)
        self.reply_maxlen = reply_maxlen
        self.shadow_batch_wait_ms = shadow_batch_wait_ms
        self.revision = 0
        self._reload_at: float | None = None
        """When to try again a model that would not load at the last change (None: all did)."""
        self._load_spells: dict[str, RetryLog] = {}
        """Role -> the log of its model's failures to load: said when they start, then once
        every 30 s while they last, and when it loads (not an ERROR every retry)."""
        self._streams: tuple[str, ...] = (self.stream,)
        self._published: frozenset[str] = frozenset(self._streams)
        """The streams requests go to now; the others are deleted once drained."""

    # -- the first role (the only one of a worker of one role) ---------------------------------

    @property
    def role(self) -> str:
        return self.first.role

    @property
    def stats(self) -> WorkerStats:
        return self.first.stats

    @property
    def model(self) -> OnnxClassifier | None:
        return self.first.model

    @property
    def model_ref(self) -> ModelRef | None:
        return self.first.model_ref

    def stats_json(self, now_s: float) -> str:
        return self.first.stats_json(now_s)

    # -- roles and models ----------------------------------------------------------------------

    def serving_beside(self) -> tuple[str, ...]:
        """The roles served besides the first (from any thread)."""
        return tuple(role for role in tuple(self.roles) if role != self.first.role)

    def serve_roles(self, roles: Mapping[str, str]) -> None:
        """From any thread: serve exactly these roles (role -> consumer name) besides the first,
        from the next step on."""
        with self._wanted_lock:
            self._wanted = {r: c for r, c in roles.items() if r != self.first.role}

    def load(self) -> None:
        """Load the model versions that hold this worker's roles now."""
        dep = self.store.get(self.deployment)
        self._follow_partitions(dep)
        self.revision = dep.revision
        for role in self.roles.values():
            role.follow(dep)
        self._follow_waits()

    def _apply_wanted(self) -> None:
        with self._wanted_lock:
            wanted, self._wanted = self._wanted, None
        if wanted is None:
            return
        extra = {r: m for r, m in self.roles.items() if m is not self.first}
        for role in [r for r in extra if r not in wanted]:
            self._drop(role)
        now = time.monotonic()
        new = {r: c for r, c in wanted.items()
               if r not in self.roles and self._broken.get(r, (0.0, 0.0))[0] <= now}  # fmt: skip
        if not new:
            return
        try:
            dep = self.store.get(self.deployment)
        except DeploymentUnreadable:  # a newer version's state: the new roles wait for it
            return
        for role, consumer in new.items():
            model = RoleModel(self.registry, self.deployment, role, consumer,
                              self.shadow_batch_wait_ms, self.run_limit)  # fmt: skip
            try:
                model.follow(dep)
            except DeploymentNotFound:
                continue  # removed meanwhile: the host will not ask again
            except Exception:  # its model cannot load: the other roles go on meanwhile
                backoff = min(self._broken.get(role, (0.0, RETRY_MIN_S / 2))[1] * 2, RETRY_MAX_S)
                self._broken[role] = (now + backoff, backoff)
                self.load_failures += 1
                log.exception("%s/%s cannot be served; trying again in %.1fs", self.deployment,
                              role, backoff)  # fmt: skip
                continue
            self._broken.pop(role, None)
            self.roles[role] = model
            self._by_member[id(model.member)] = model
            self.join(model.member)
            log.info("%s: %s/%s is now served beside %s", self.first.consumer,
                     self.deployment, role, self.first.role)  # fmt: skip
        self._follow_waits()

    def _drop(self, role: str) -> None:
        self.flush()  # its last heartbeat lands before its counters are removed, not after
        model = self.roles.pop(role)
        self._by_member.pop(id(model.member), None)
        self.leave(model.member)
        self._unpublish([model])
        self._follow_waits()
        log.info("%s: %s/%s is no longer served here", self.first.consumer, self.deployment, role)

    def _follow_waits(self) -> None:
        """A batch waits as long as the most hurried of its roles allows."""
        self.batch_wait_s = min(role.batch_wait_s for role in self.roles.values())

    def _follow_partitions(self, dep: Deployment) -> None:
        """Read every input partition of ``dep``, making sure their groups exist (a change of
        the partition count cut short is finished here)."""
        streams = tuple(dep.input_streams)
        self._published = frozenset(() if dep.deleted_ms else dep.published_streams)
        if streams != self._streams:
            if len(streams) > 1:
                ensure_groups(self.client, dep)
            self._streams = streams

    # -- the consumer loop's hooks ---------------------------------------------------------------

    def streams_to_read(self) -> tuple[str, ...]:
        if self.first.model is None:  # the model before the first read
            self.load()
        self._apply_wanted()
        return self._streams

    def makes_stream(self, stream: str) -> bool:
        # A stream it reads that is not published to (a deleted deployment's, an earlier
        # partition count's) is deleted once drained: read on without it (never made here).
        return stream in self._published

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        # A role removed from the deployment takes its consumer group with it.
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
            gone = self._roles_gone()
            if self.first.role in gone:
                log.info("%s/%s: the role is gone; stopping", self.deployment, self.first.role)
                return False
            for role in gone:
                self._drop(role)
            if gone:
                return True
            # A stream of an earlier partition count, drained and deleted: follow the state
            # that leaves it out. Or a live stream's group lost (Redis restarted without it):
            # made again, at the start, and read on.
            try:
                dep = self.store.get(self.deployment)
                ensure_groups(self.client, dep)
                self._follow(dep)
            except NOT_NOW as again:
                log.warning("%s: a consumer group vanished (%s); not made again yet: %s",
                            self.deployment, exc, again)  # fmt: skip
            else:
                log.info("%s: a consumer group vanished (%s); following revision %d",
                         self.deployment, exc, dep.revision)  # fmt: skip
            return True
        retry = super().failed(exc, retry_in_s)
        for model in self.roles.values():  # rdv_worker_errors_total: Redis down or full,
            model.stats.errors += 1  # counted for every role it held up
        return retry

    def close(self) -> None:
        """A clean stop removes this worker's published counters and liveness, so they vanish
        from ``/metrics`` and readiness at once (a killed worker's entry only goes stale)."""
        self.unpublish()
        super().close()

    def process(self, batch: Batch) -> int:
        """One onnxruntime call per role, one write round trip. Returns entries handled."""
        for member in batch.members[: batch.claimed]:
            self._by_member[id(member)].stats.reclaimed += 1
        # The revision rode along with the read (same round trip), so a batch is scored by
        # the version holding the role when it was read: a promotion takes effect at once,
        # not at the next heartbeat.
        revision = batch.along[0] if batch.along else None
        moved = revision is not None and int(revision) != self.revision
        if moved or (self._reload_at is not None and time.monotonic() >= self._reload_at):
            self._maybe_reload(self.client.get(names.deployment_key(self.deployment)))
        # Redis's time of the read rode along: deadlines, waits, heartbeats judged on it.
        bus_ms = self.redis_clock.now_ms(batch.along[1] if len(batch.along) > 1 else None)
        now = self.heartbeat_due()
        if not batch.entries and now is None:
            return 0
        beat = None if now is None else now if bus_ms is None else bus_ms / 1000
        return self._handle(batch.entries, batch.members, beat, bus_ms)

    def unpublish(self) -> None:
        """Remove this worker's counters from the stats hash (best effort: Redis may be down)."""
        self._unpublish(list(self.roles.values()))

    def _unpublish(self, roles: list[RoleModel]) -> None:
        members = [names.worker_member(role.role, role.consumer) for role in roles]
        try:  # its liveness too: readiness sees the stop at once (one slot: one pipeline)
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(names.stats_key(self.deployment), *members)
            pipe.zrem(names.workers_key(self.deployment), *members)
            pipe.execute()
        except REDIS_FAILURES as exc:
            log.warning("could not remove the stats of %s: %s", ", ".join(members), exc)

    def _roles_gone(self) -> list[str]:
        try:
            dep = self.store.get(self.deployment)
        except DeploymentNotFound:
            return list(self.roles)
        except DeploymentUnreadable:
            return []  # a newer version's state: served as it was (as ``_maybe_reload``)
        if dep.deleted_ms:  # being purged: only drained streams are deleted
            return list(self.roles)
        return [role for role in self.roles if role not in dep.roles]

    def _handle(self, entries: list[Entry], members: list[Membership], beat: float | None,
                bus_ms: float | None = None) -> int:  # fmt: skip
        """Score (each entry decoded once, whichever roles read it), then results, acks and
        (``beat``: its time, when due) the heartbeats in one round trip (``bus_ms``: Redis's
        time of the read)."""
        read = triage(entries, members, lambda m: self._by_member[id(m)], bus_ms,
                      time.time() * 1000)  # fmt: skip
        replies: list[Scored] = []
        for member_id, role_live in read.live.items():
            replies += self._by_member[member_id].score(role_live)
        if entries:
            for member_id in {id(m) for m in members}:
                self._by_member[member_id].stats.batches += 1
        commands = reply_commands(replies, self.reply_maxlen)
        results = len(commands)
        for (stream, group), ids in read.acks.items():  # each on its partition's node
            commands.append(command(b"XACK", stream.encode(), group, *ids))
        essential = len(commands)
        if beat is not None:
            # The heartbeats ride with the results: liveness and counters cost no round trip
            # of their own (the deployment's revision came with the read).
            for role in self.roles.values():
                commands += role.heartbeat(beat)
        # On a cluster the results go to each gateway's node, the acks to each partition's and
        # the heartbeat to the deployment's, in one round trip per node, all written before any
        # reply is read; and they go ahead of the next read, in its round trip (on a cluster,
        # only ahead of a read that does not block: ``rendezvous.bus.reader``).
        self.write_with_next_read(commands, functools.partial(check_written, results, essential))
        return len(entries)

    def _maybe_reload(self, raw: bytes | str | None) -> None:
        """Follow a deployment change whose revision came with a read (hot swap)."""
        state = self._states.parse(self.deployment, raw) if raw is not None else None
        if state is not None:  # unreadable (a newer version's?): served as it was, said once
            self._follow(state)

    def _follow(self, dep: Deployment) -> None:
        """Follow the deployment's state when its revision moved: partitions, models."""
        again = self._reload_at is not None and time.monotonic() >= self._reload_at
        if dep.revision == self.revision and not again:
            return
        self.revision = dep.revision
        self._follow_partitions(dep)
        self._reload_at = None
        for role in self.roles.values():
            if role.role not in dep.roles:
                log.warning("role %s was removed from %s; keeping %s until stopped", role.role,
                            self.deployment, role.model_ref)  # fmt: skip
                continue
            spell = self._load_spells.get(role.role)
            try:
                role.follow(dep)
            except Exception as exc:
                # Tried again every RELOAD_RETRY_S: once only, a model that failed to load
                # (its file not yet there, a delete racing the promote) left the old one
                # answering as the role for good, with nothing to say so but one log line.
                # Said once a spell: a host that cannot see the version (its own models
                # folder) logged an ERROR every 5-6 s; rdv_stale_workers says it meanwhile.
                self._reload_at = time.monotonic() + RELOAD_RETRY_S
                self.load_failures += 1
                if spell is None:
                    spell = self._load_spells[role.role] = RetryLog(
                        log, f"{self.deployment}/{role.role}"
                    )
                spell.failed(f"cannot load {dep.roles[role.role]} ({exc}); keeping "
                             f"{role.model_ref}", retry_in_s=RELOAD_RETRY_S, level=logging.ERROR,
                             exc_info=None if again else exc)  # fmt: skip
            else:
                if spell is not None:
                    spell.succeeded()  # "working again after 41.2s (7 failed tries)"
        self._follow_waits()
