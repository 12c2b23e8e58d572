"""Purging a deleted deployment once what it accepted is drained, and the input streams of a
deployment's earlier partition counts once they are.

A delete (``DeploymentStore.delete``) only marks the state: gateways stop publishing to it at
their next refresh (a second), while its workers and the log bin read on. The log bin, which
must have archived everything first, looks at each deleted deployment every few seconds.
Past the grace (for gateways that have not refreshed yet), each input stream is deleted by
one script that first checks that every group has read and acknowledged all of it: the log
bin's always, the models' until ``model_wait_s`` (a model whose worker never comes back must
not hold the purge for ever). Check and delete are one command, so an append that came in
between keeps the stream for the next look. Gateways append with NOMKSTREAM: one that has not
seen the delete yet gets an error (503), never an entry that no reader will look at.

With every stream gone, the state and what serves it go in one transaction on the
deployment's hash tag (only if it is still the deleted state: a deployment created again
under the name is left alone), and the name leaves the set of deployments. What records the
past stays: the history (continued by a deployment created again under the name), the
archive on disk, the outcome and label buckets until they expire (request ids join there),
replays and loaded entities. What a deployment made again under the name would read as its
own goes: the labelled stream, the drift and accuracy history.

A change of the partition count leaves the streams of the earlier count published to no more
(``models.deployments.with_partitions``); they are read until drained, then deleted the same
way (one script a stream), and only then does the count leave the state: readers stop reading
a stream once it is gone, never before.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from models.deployment_store import DeploymentStore
from models.deployments import (
    Deployment,
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentUnreadable,
    without_past_partitions,
)
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.bus.failures import REDIS_FAILURES

log = logging.getLogger(__name__)

MODEL_WAIT_S = 300.0
"""How long the models' groups may hold a purge after the grace: past it, only the log bin's
group must have drained (a model's worker that never comes back would hold it for ever)."""

_DRAINED_THEN_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
local last
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local archived = false
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #group, 2 do f[group[i]] = group[i + 1] end
  if f['name'] == ARGV[1] then archived = true end
  if (ARGV[2] == '1' or f['name'] == ARGV[1])
      and (f['pending'] > 0 or f['last-delivered-id'] ~= last) then
    return 0
  end
end
if not archived and redis.call('XLEN', KEYS[1]) > 0 then return 0 end
if ARGV[3] ~= '1' then redis.call('DEL', KEYS[1]) end
return 1
"""
"""Delete the stream (KEYS[1]) if every group that must (ARGV[1] the log bin's; ARGV[2] '1':
every one) has read all of it and has nothing pending: 1 when it is gone (or, ARGV[3] '1',
only asked: would go), 0 when it stays."""

_FAIL_QUEUED_JOBS = """
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'status') == 'pending' then
    redis.call('HSET', key, 'status', 'failed', 'error', ARGV[1], 'ended_ms', ARGV[2])
    redis.call('HDEL', key, 'body')
    local ttl = redis.call('HGET', key, 'ttl_s')
    if ttl then redis.call('EXPIRE', key, ttl) end
  end
end
return #KEYS
"""
"""End each job hash of KEYS still pending as failed (ARGV[1] its error JSON, ARGV[2] now ms),
as ``gateway.dataplane.job_store`` ends a job; its TTL counts from now."""


def serving_keys(deployment: str) -> list[str]:
    """What serves a deployment, all under its hash tag: purged with its state."""
    return [
        names.deployment_key(deployment),
        names.revision_key(deployment),
        names.workers_key(deployment),
        names.stats_key(deployment),
        names.skipped_key(deployment),
        names.decisions_stream(deployment),
        names.jobs_stream(deployment),
        names.jobs_done_stream(deployment),
        names.jobs_held_key(deployment),
        names.jobs_held_bytes_key(deployment),
        names.outcomes_state_key(deployment),
        names.outcomes_lease_key(deployment),
        names.accuracy_key(deployment),
        names.accuracy_lock_key(deployment),
        # Read as the deployment's own by one made again under the name (its live accuracy,
        # its promotion gate, its charts): a new one showed the old one's 60 labels and
        # accuracy (found by a helper's churn probe). None of them expires by itself.
        names.labelled_stream(deployment),
        names.accuracy_history_stream(deployment),
        names.drift_history_stream(deployment),
        names.drift_feature_history_stream(deployment),
        names.drift_sketch_stream(deployment),
        names.drift_report_key(deployment),
        names.drift_features_key(deployment),
        names.drift_reference_key(deployment),
        names.drift_thresholds_key(deployment),
        names.drift_alerts_key(deployment),
        names.drift_claims_key(deployment),
        names.drift_relayed_key(deployment),
        names.drift_delivered_key(deployment),
        names.drift_event_counts_key(deployment),
        names.drift_lock_key(deployment),
    ]


class Purger:
    """Run by the log bin: ``look`` at the deployments it reads; purge the deleted ones once
    drained, and the drained streams of earlier partition counts."""

    def __init__(
        self,
        client: Client,
        grace_s: float,
        every_s: float = 2.0,
        model_wait_s: float = MODEL_WAIT_S,
        clock: Callable[[], float] = time.time,
    ):
        self.client = client
        self.grace_s = grace_s
        self.every_s = every_s
        self.model_wait_s = model_wait_s
        self._clock = clock
        self._next = 0.0
        self._script = client.register_script(_DRAINED_THEN_DELETE)
        self.store = DeploymentStore(client)
        self.purged: list[str] = []
        """The deployments this purger has purged, oldest first."""

    def look(self, deployments: list[Deployment]) -> list[str]:
        """Purge every deleted deployment of ``deployments`` that is drained, and retire the
        drained streams of earlier partition counts of the others (at most every
        ``every_s``); returns the deployments purged now. Redis failing is logged: the next
        look tries again."""
        now = self._clock()
        due = [d for d in deployments if d.deleted_ms or d.past_partitions]
        if not due or now < self._next:
            return []
        self._next = now + self.every_s
        done = []
        for dep in due:
            try:
                if dep.deleted_ms and self._purge(dep, now):
                    done.append(dep.name)
                elif not dep.deleted_ms:
                    self._retire_partitions(dep, now)
            except REDIS_FAILURES as exc:  # script errors too (ResponseError)
                log.warning("purge of %s's drained streams: %s; trying again later", dep.name, exc)
            except (DeploymentNotFound, DeploymentUnreadable, ValueError) as exc:  # gone meanwhile?
                log.info("purge of %s's drained streams: %s", dep.name, exc)
        self.purged += done
        return done

    def _retire_partitions(self, dep: Deployment, now_s: float) -> None:
        """The streams of an earlier partition count take nothing new once every gateway
        follows the change: past the grace (counted from the state's last change, which is no
        earlier than the partitions'), each is deleted once drained, and the count leaves the
        state, so its readers stop reading it."""
        changed_s = dep.updated_ms / 1000
        if now_s < changed_s + self.grace_s:
            return
        every_group = b"1" if now_s < changed_s + self.grace_s + self.model_wait_s else b"0"
        published = set(dep.published_streams)
        for count in dep.past_partitions:
            others = {s for c in dep.past_partitions if c != count
                      for s in names.input_streams(dep.name, c)}  # fmt: skip
            streams = [s for s in names.input_streams(dep.name, count)
                       if s not in published and s not in others]  # fmt: skip
            # All of them drained first: one deleted while another is still read would leave
            # its readers reading around a gap until the other drained.
            if not all(self._drained(s, every_group, only_ask=True) for s in streams):
                continue
            if self.store.get(dep.name).revision != dep.revision:
                return  # changed meanwhile (the count set again?): the next look, afresh
            if not all(self._drained(s, every_group) for s in streams):
                continue  # an append came in meanwhile: the next look
            try:
                self.store.update(dep.name, partial(without_past_partitions, count=count),
                                  action="retire-partitions", actor="logbin",
                                  detail={"partitions": count})  # fmt: skip
            except (DeploymentConflict, DeploymentNotFound):
                return  # set again, or deleted, meanwhile: its readers make what they need
            log.info("%s: the streams of its earlier %d partitions were drained and deleted",
                     dep.name, count)  # fmt: skip

    def _drained(self, stream: str, every_group: bytes, only_ask: bool = False) -> bool:
        """Whether ``stream`` is drained (then deleted, unless ``only_ask``) or gone."""
        ask = b"1" if only_ask else b"0"
        return bool(self._script(keys=[stream], args=[names.LOGBIN_GROUP, every_group, ask]))

    def _purge(self, dep: Deployment, now_s: float) -> bool:
        deleted_s = dep.deleted_ms / 1000
        if now_s < deleted_s + self.grace_s:
            return False
        if not self._still_deleted(dep):
            return False  # purged by another bin, and perhaps created again: not ours to touch
        every_group = b"1" if now_s < deleted_s + self.grace_s + self.model_wait_s else b"0"
        if not all(self._drained(s, every_group, only_ask=True) for s in dep.input_streams):
            return False  # all at once: a worker stops once its streams are gone
        if not all(self._drained(s, every_group) for s in dep.input_streams):
            return False  # an append came in meanwhile: the next look
        if not self._drop_state(dep):
            return False
        self.client.srem(names.DEPLOYMENTS_SET, dep.name)
        if self.client.exists(names.deployment_key(dep.name)):
            self.client.sadd(names.DEPLOYMENTS_SET, dep.name)  # created again meanwhile
        log.info("purged deleted deployment %s: everything it accepted was drained", dep.name)
        return True

    def _still_deleted(self, dep: Deployment) -> bool:
        """Its state is still the deleted one (None: purged already, streams and all). While it
        is, nothing can be created under the name (``DeploymentStore.create`` refuses)."""
        raw = self.client.get(names.deployment_key(dep.name))
        return raw is None or Deployment.from_json(raw).deleted_ms == dep.deleted_ms

    def _drop_state(self, dep: Deployment) -> bool:
        """Its state and serving keys, in one transaction, if the state is still the deleted
        one (False: created again, or changed under us). Jobs still queued end as failed in
        it: the gateways' job readers fail a deleted deployment's jobs as they read them, but
        one never read (no gateway read the stream before the purge) stayed pending until its
        TTL, and read so by a deployment made again under the name."""
        key = names.deployment_key(dep.name)
        stream = names.jobs_stream(dep.name)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, stream)  # a job ended or queued meanwhile: the next look
                raw = pipe.get(key)
                if raw is not None and Deployment.from_json(raw).deleted_ms != dep.deleted_ms:
                    return False
                queued = [names.job_key(dep.name, job_id) for job_id in self._queued(pipe, stream)]
                pipe.multi()
                if queued:
                    error = {"status": 404, "detail": f"deployment {dep.name!r} was deleted "
                             "before the job ran"}  # fmt: skip
                    now_ms = int(self._clock() * 1000)
                    # as a command: redis-py's cluster pipeline has no eval()
                    pipe.execute_command("EVAL", _FAIL_QUEUED_JOBS, len(queued), *queued,
                                         json.dumps(error), now_ms)  # fmt: skip
                pipe.unlink(*serving_keys(dep.name))  # big streams freed off Redis's main thread
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    @staticmethod
    def _queued(pipe: Any, stream: str) -> list[str]:
        """The ids of the jobs a deployment's jobs stream still lists (at most
        ``RDV_JOB_MAX_QUEUED``): one entry a job not yet ended, its ``id`` field."""
        found = []
        for _, fields in pipe.xrange(stream):
            job_id = fields.get(b"id")
            if job_id is not None:
                try:
                    found.append(names.check_job_id(job_id.decode()))
                except (UnicodeDecodeError, names.InvalidName):
                    continue  # not a job's entry: nothing to end
        return found
