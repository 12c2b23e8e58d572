"""Purging a deleted deployment once what it accepted is drained.

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
archive on disk, outcomes and labels until they expire, the drift and accuracy history,
replays and loaded entities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from models.deployments import Deployment
from rendezvous import names
from rendezvous.bus.connection import REDIS_FAILURES, Client

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
redis.call('DEL', KEYS[1])
return 1
"""
"""Delete the stream (KEYS[1]) if every group that must (ARGV[1] the log bin's; ARGV[2] '1':
every one) has read all of it and has nothing pending: 1 when it is gone, 0 when it stays."""


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
        names.outcomes_state_key(deployment),
        names.outcomes_lease_key(deployment),
        names.accuracy_key(deployment),
        names.drift_sketch_stream(deployment),
        names.drift_report_key(deployment),
        names.drift_features_key(deployment),
        names.drift_reference_key(deployment),
        names.drift_thresholds_key(deployment),
        names.drift_alerts_key(deployment),
        names.drift_claims_key(deployment),
        names.drift_relayed_key(deployment),
        names.drift_event_counts_key(deployment),
        names.drift_lock_key(deployment),
    ]


class Purger:
    """Run by the log bin: ``look`` at the deleted deployments it reads, purge those drained."""

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
        self.purged: list[str] = []
        """The deployments this purger has purged, oldest first."""

    def look(self, deleted: list[Deployment]) -> list[str]:
        """Purge every deployment of ``deleted`` that is drained (at most every ``every_s``);
        returns those purged now. Redis failing is logged: the next look tries again."""
        now = self._clock()
        if not deleted or now < self._next:
            return []
        self._next = now + self.every_s
        done = []
        for dep in deleted:
            try:
                if self._purge(dep, now):
                    done.append(dep.name)
            except REDIS_FAILURES as exc:  # script errors too (ResponseError)
                log.warning("purge of deleted deployment %s: %s; trying again later", dep.name, exc)
        self.purged += done
        return done

    def _purge(self, dep: Deployment, now_s: float) -> bool:
        deleted_s = dep.deleted_ms / 1000
        if now_s < deleted_s + self.grace_s:
            return False
        if not self._still_deleted(dep):
            return False  # purged by another bin, and perhaps created again: not ours to touch
        every_group = b"1" if now_s < deleted_s + self.grace_s + self.model_wait_s else b"0"
        gone = [bool(self._script(keys=[stream], args=[names.LOGBIN_GROUP, every_group]))
                for stream in dep.input_streams]  # fmt: skip
        if not all(gone):
            return False
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
        one (False: created again, or changed under us)."""
        key = names.deployment_key(dep.name)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is not None and Deployment.from_json(raw).deleted_ms != dep.deleted_ms:
                    return False
                pipe.multi()
                pipe.delete(*serving_keys(dep.name))
                pipe.execute()
            except redis.WatchError:
                return False
        return True
