"""Replay reports in Redis: kept by id, listed per deployment, leased while they run.

A report is rewritten after every batch with its position, so a stopped replay (asked to,
or its gateway gone) resumes where it was, on any gateway. Its runner holds a lease (a key
with a short expiry, renewed in the same round trip as each checkpoint): a ``running`` report
whose lease lapsed is shown as ``interrupted``. Every key lies in the deployment's hash slot.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

from rendezvous import names
from rendezvous.bus.connection import Client, text

LEASE_MS = 30_000
"""How long a runner's lease lasts without a checkpoint; a batch takes far less."""
LIST_LIMIT = 100
_RELEASE = """
local holder = redis.call('GET', KEYS[1])
for _, owner in ipairs(ARGV) do
  if holder == owner then return redis.call('DEL', KEYS[1]) end
end
return 0
"""
HANDING_OVER = "gateway"
"""The lease's holder while a gateway starts (or resumes) a replay, until its runner's first
save takes the lease under its own name."""
_OWNED = """
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[3] and held ~= ARGV[5] then return -1 end
redis.call('HSET', KEYS[1], 'report', ARGV[1], 'state', ARGV[2])
"""
_CHECKPOINT = (
    _OWNED
    + """
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return redis.call('HEXISTS', KEYS[1], 'cancel')
"""
)
"""KEYS: the report, the lease; ARGV: report, state, owner, lease ms, ``HANDING_OVER``. A
runner taken for dead
while Redis was away (its lease lapsed, and the replay was resumed elsewhere) saves nothing
over the runner that holds the lease now (-1): it kept writing, and both ran."""
_FINISH = (
    _OWNED
    + """
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('DEL', KEYS[2])
return 0
"""
)


class LeaseLost(Exception):
    """Another runner holds the replay's lease: this one stops and saves nothing more."""


RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"
RESUMABLE = (INTERRUPTED, FAILED)


def new_replay_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{ms:x}-{os.urandom(6).hex()}"


class ReplayStore:
    def __init__(self, client: Client):
        self.client = client

    def create(
        self, deployment: str, report: dict[str, Any], state: dict[str, Any], owner: str
    ) -> None:
        """Store a new report and take its lease, in one transaction."""
        rid = report["id"]
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(names.replay_key(deployment, rid),
                  mapping={"report": json.dumps(report), "state": json.dumps(state)})  # fmt: skip
        pipe.zadd(names.replays_index(deployment), {rid: report["timing"]["created_ms"]})
        pipe.set(names.replay_lock_key(deployment, rid), owner, px=LEASE_MS)
        pipe.execute()

    def take_lease(self, deployment: str, replay_id: str, owner: str) -> bool:
        """False when another runner holds it (the replay is running)."""
        key = names.replay_lock_key(deployment, replay_id)
        return bool(self.client.set(key, owner, px=LEASE_MS, nx=True))

    def checkpoint(
        self, deployment: str, report: dict[str, Any], state: dict[str, Any], owner: str
    ) -> bool:
        """Save the report and the runner's state, renew the lease; True when someone asked
        the replay to stop. ``LeaseLost`` when another runner holds the lease."""
        return self._save(_CHECKPOINT, deployment, report, state, owner) == 1

    def finish(
        self, deployment: str, report: dict[str, Any], state: dict[str, Any], owner: str
    ) -> None:
        """Save the last report (done, failed or interrupted) and let the lease go;
        ``LeaseLost`` (nothing saved) when another runner holds it."""
        self._save(_FINISH, deployment, report, state, owner)

    def _save(self, script: str, deployment: str, report: dict[str, Any],
              state: dict[str, Any], owner: str) -> int:  # fmt: skip
        rid = report["id"]
        keys = (names.replay_key(deployment, rid), names.replay_lock_key(deployment, rid))
        got = int(self.client.eval(script, 2, *keys, json.dumps(report), json.dumps(state),
                                   owner, str(LEASE_MS), HANDING_OVER))  # fmt: skip
        if got < 0:
            raise LeaseLost(f"replay {rid} of {deployment} is another runner's now")
        return got

    def release_lease(self, deployment: str, replay_id: str, owners: tuple[str, ...]) -> bool:
        """Let the lease go if one of ``owners`` holds it (a runner known dead), so the
        report reads interrupted now rather than once the lease lapses; True if it went."""
        key = names.replay_lock_key(deployment, replay_id)
        return bool(self.client.eval(_RELEASE, 1, key, *owners))

    def request_cancel(self, deployment: str, replay_id: str) -> None:
        self.client.hset(names.replay_key(deployment, replay_id), "cancel", "1")

    def stored(
        self, deployment: str, replay_id: str
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(report, runner state) as last saved, without the lease's view of the report."""
        raw, state = self.client.hmget(names.replay_key(deployment, replay_id), ["report", "state"])
        if raw is None:
            return None
        return dict(json.loads(text(raw))), dict(json.loads(text(state))) if state else {}

    def get(self, deployment: str, replay_id: str) -> dict[str, Any] | None:
        """The report; a running one whose runner is gone says ``interrupted``."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(names.replay_key(deployment, replay_id), "report")
        pipe.exists(names.replay_lock_key(deployment, replay_id))
        raw, leased = pipe.execute()
        if raw is None:
            return None
        return _as_seen(json.loads(text(raw)), bool(leased))

    def list(self, deployment: str, limit: int = LIST_LIMIT) -> list[dict[str, Any]]:
        """The latest ``limit`` reports, newest first."""
        found = self.client.zrevrange(names.replays_index(deployment), 0, limit - 1)
        ids = [text(i) for i in cast(list[bytes], found)]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(names.replay_key(deployment, rid), "report")
            pipe.exists(names.replay_lock_key(deployment, rid))
        replies = pipe.execute()
        out = []
        for raw, leased in zip(replies[::2], replies[1::2], strict=True):
            if raw is not None:
                out.append(_as_seen(json.loads(text(raw)), bool(leased)))
        return out


def _as_seen(report: dict[str, Any], leased: bool) -> dict[str, Any]:
    if report.get("state") == RUNNING and not leased:
        report["state"] = INTERRUPTED
        report["reason"] = ("its runner stopped before the end (its process or its gateway "
                            "ended): resume it (POST .../resume)")  # fmt: skip
    return report


def replay_report_for(
    client: Client,
    deployment: str,
    version: int,
    model: str | None = None,
    min_records: int | None = None,
) -> dict[str, Any] | None:
    """The latest finished (``done``) replay report of a model version (of ``model``, any
    name if None) that scored at least ``min_records``, else the latest finished one, for a
    promotion gate that requires one; None if there is none. Without a floor, the one that
    scored the most records (the latest of those). Why: a quick replay of a few records, run
    after a full one, decided the gate alone (found by helpers' probes, with and without a
    floor)."""
    finished = []
    for report in ReplayStore(client).list(deployment):
        ref = report.get("model", {})
        if report.get("state") != DONE or ref.get("version") != version:
            continue
        if model is None or ref.get("name") == model:
            finished.append(report)
    if not finished:
        return None
    if min_records is None:  # newest first: max keeps the latest of equals
        return max(finished, key=lambda r: int(r.get("records") or 0))
    enough = [r for r in finished if int(r.get("records") or 0) >= min_records]
    return (enough or finished)[0]
