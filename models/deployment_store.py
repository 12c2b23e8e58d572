"""Deployment state in Redis: one JSON document per deployment, so every gateway and worker
process sees the same thing. Every change goes through ``DeploymentStore.update``: an optimistic
transaction (WATCH/MULTI) that bumps the monotonically increasing ``revision``, appends a
history entry (who, when, what, why, and the roles and schedule after it, which is what a
rollback restores) and moves the consumer groups along with the roles, all at once.

Consumer groups follow roles (``model:<role>``). A deployment's first groups start at the
beginning of its stream, so every bin gets every request from the first one on; a role added
later gets a fresh group at the stream's current end (``$``), so it scores what comes next and
never replays history; a role that leaves loses its group, so the stream is not held back for
a reader that is gone.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from models.deployment_history import history_entry, role_since_ms, state_at
from models.deployments import (
    Deployment,
    DeploymentConflict,
    DeploymentNotFound,
    ModelRef,
    StateReader,
    deleted,
)
from rendezvous import names
from rendezvous.bus.connection import Client, text

_DELETE_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _roles_held_rewritten(ref: ModelRef, name: str, key: str, pipe: Any) -> list[str]:
    """In a transaction watching ``key``: the state written back as read, and the roles of it
    that ``ref`` holds (``DeploymentStore.holders_of``)."""
    raw = pipe.get(key)
    pipe.multi()
    if raw is None:
        return []
    pipe.set(key, raw)
    return [f"{name}/{r}" for r, held in Deployment.from_json(raw).roles.items() if held == ref]


def _make_new_partitions(client: Client, before: Deployment, after: Deployment) -> None:
    """The input streams a change of partitions adds, with their groups, made before the state
    that names them is written: a gateway that read the new state first sent requests to a
    stream not made yet, and answered 503 "input stream is gone" (1 of 805 requests through a
    change from 3 partitions to 2, a loaded CI run). A change tried again (another writer got
    in first) may leave such a stream unused: empty, and no reader's."""
    new = [s for s in after.input_streams if s not in set(before.input_streams)]
    if not new or after.deleted_ms:
        return
    pipe = client.pipeline(transaction=False)
    for stream in new:
        for group in sorted(after.groups()):
            pipe.xgroup_create(stream, group, id="0", mkstream=True)
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and not _tolerated(result):
            raise result


def ensure_groups(client: Client, deployment: Deployment) -> None:
    """Create the consumer groups missing on any input partition, positioned at its start (so
    a partition an envelope reached before its groups did loses nothing), and remove the groups
    of roles that left. Idempotent: it finishes what a change cut short (``update`` changes the
    groups of partition 0 in its transaction, the others after it), and every worker runs it
    when it loads a new revision."""
    wanted = set(deployment.groups())
    # A deleted deployment's streams are never made again: once purged, a stale gateway's
    # append (NOMKSTREAM) must fail rather than land where no reader will look.
    # Nor are the streams of an earlier partition count, deleted once drained.
    made = set() if deployment.deleted_ms else set(deployment.published_streams)
    pipe = client.pipeline(transaction=False)
    for stream in deployment.input_streams:
        for group in sorted(wanted):
            pipe.xgroup_create(stream, group, id="0", mkstream=stream in made)
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and not _tolerated(result):
            raise result
    stale: list[tuple[str, str]] = []
    for stream in deployment.input_streams[1:]:
        if stream not in made and not client.exists(stream):
            continue
        for info in client.xinfo_groups(stream):
            group = text(info["name"])
            if group.startswith(names.MODEL_GROUP_PREFIX) and group not in wanted:
                stale.append((stream, group))
    for stream, group in stale:
        client.xgroup_destroy(stream, group)


def _tolerated(error: Exception) -> bool:
    """The group is there already, or a stream not ``made`` is gone: purged."""
    return "BUSYGROUP" in str(error) or "requires the key to exist" in str(error)


# -- the store ---------------------------------------------------------------------------------


class DeploymentStore:
    """Synchronous access for the CLI, workers, the admin API and start-up."""

    def __init__(self, client: Client):
        self.client = client
        self._reader = StateReader("deployments")

    def get(self, name: str) -> Deployment:
        raw = self.client.get(names.deployment_key(name))
        if raw is None:
            raise DeploymentNotFound(f"deployment {name!r} does not exist")
        return Deployment.from_json(raw)

    def input_view(self, dep: Deployment) -> builtins.list[dict[str, Any]]:
        """Each input stream of ``dep`` with its length and its groups' backlog (pending, and
        lag on Redis 7+): where a partition falls behind. One pipelined read."""
        pipe = self.client.pipeline(transaction=False)
        for stream in dep.input_streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
        out = []
        for k, stream in enumerate(dep.input_streams):
            length, groups = replies[2 * k], replies[2 * k + 1]
            out.append({
                "partition": k,
                "stream": stream,
                "published_to": k < dep.partitions,
                "length": length if isinstance(length, int) else 0,
                "groups": {
                    text(g["name"]): {"pending": g.get("pending"), "lag": g.get("lag"),
                                      "consumers": g.get("consumers")}
                    for g in (groups if isinstance(groups, builtins.list) else [])
                },
            })  # fmt: skip
        return out

    def list(self) -> list[str]:
        return sorted(text(m) for m in self.client.smembers(names.DEPLOYMENTS_SET))

    def current(self, known: Mapping[str, Deployment]) -> dict[str, Deployment]:
        """Every deployment now, for a process that follows them all every few seconds: one
        round trip reads the names and revisions, and only the states whose revision moved
        since ``known`` are read again (a state with its feature statistics is ~18 kB; a
        revision a few bytes). One deleted meanwhile is left out."""
        members = self.list()
        pipe = self.client.pipeline(transaction=False)
        for name in members:
            pipe.get(names.revision_key(name))
        revisions = pipe.execute()
        stale = [name for name, rev in zip(members, revisions, strict=True)
                 if rev is None or name not in known
                 or known[name].revision != int(rev)]  # fmt: skip
        out = {name: known[name] for name in members if name not in stale}
        if stale:
            pipe = self.client.pipeline(transaction=False)
            for name in stale:
                pipe.get(names.deployment_key(name))
            for name, raw in zip(stale, pipe.execute(), strict=True):
                state = self._reader.parse(name, raw) if raw is not None else None
                if state is not None:
                    out[name] = state
                elif raw is not None and name in known:  # unreadable: as it was
                    out[name] = known[name]
        return out

    def create(
        self,
        deployment: Deployment,
        *,
        actor: str = "system",
        reason: str = "",
        check: Callable[[Deployment], None] | None = None,
    ) -> bool:
        """Create unless it exists; False when another process was first. One created again
        after a delete goes on from its last revision (its history stays, and is continued).

        ``check`` runs once the state is written, before its history and groups: if it raises,
        the state is taken back and the error passes on. The name is listed before the state is
        written, so a model deletion (``holders_of``) that does not see this state was marked
        before ``check`` looks."""
        now_ms = int(time.time() * 1000)
        last = self.client.lindex(names.history_key(deployment.name), -1)
        revision = int(json.loads(last)["revision"]) + 1 if last else 1
        dep = dataclasses.replace(
            deployment, revision=revision, updated_ms=deployment.updated_ms or now_ms
        )
        self.client.sadd(names.DEPLOYMENTS_SET, dep.name)
        created = bool(self.client.set(names.deployment_key(dep.name), dep.to_json(), nx=True))
        if created and check is not None:
            try:
                check(dep)
            except BaseException:
                self._take_back(dep)
                raise
        if not created and (old := self.client.get(names.deployment_key(dep.name))) is not None:
            deleted_ms = Deployment.from_json(old).deleted_ms
            if deleted_ms:
                raise DeploymentConflict(
                    f"deployment {dep.name} was deleted at {_when(deleted_ms)} and is still "
                    "draining what it accepted; create it again once it is gone "
                    "(GET /admin/deployments/{name} answers 404 without 'deleted')"
                )
        if created:
            entry = history_entry(None, dep, "create", actor, reason, {})
            pipe = self.client.pipeline(transaction=False)
            pipe.set(names.revision_key(dep.name), dep.revision)
            pipe.rpush(names.history_key(dep.name), json.dumps(entry))
            pipe.execute()
        ensure_groups(self.client, self.get(dep.name))
        self.client.sadd(names.DEPLOYMENTS_SET, dep.name)
        return created

    def _take_back(self, dep: Deployment) -> None:
        """Undo a ``create`` that its check refused: the state goes if it is still the one
        written (else it is deleted as any other, since someone changed it meanwhile)."""
        key = names.deployment_key(dep.name)
        if not self.client.eval(_DELETE_IF_SAME, 1, key, dep.to_json()):
            with contextlib.suppress(DeploymentNotFound):
                self.delete(dep.name, actor="system", reason="created with a model deleted")
        elif self.client.get(key) is None:
            self.client.srem(names.DEPLOYMENTS_SET, dep.name)

    def update(
        self,
        name: str,
        change: Callable[[Deployment], Deployment],
        *,
        action: str,
        actor: str,
        reason: str = "",
        detail: Mapping[str, Any] | None = None,
        expect_revision: int | None = None,
    ) -> tuple[Deployment, Deployment]:
        """Apply ``change`` to the current state atomically; returns (before, after).

        ``change`` may run more than once (another writer got in first) and may raise to
        refuse. With ``expect_revision``, a state that moved on meanwhile is a conflict."""
        key = names.deployment_key(name)
        stream = names.input_stream(name)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise DeploymentNotFound(f"deployment {name!r} does not exist")
                    before = Deployment.from_json(raw)
                    if before.deleted_ms:
                        raise DeploymentNotFound(deleted_message(before))
                    if expect_revision is not None and before.revision != expect_revision:
                        raise DeploymentConflict(
                            f"{name} is at revision {before.revision}, not {expect_revision}"
                        )
                    after = dataclasses.replace(
                        change(before),
                        revision=before.revision + 1,
                        updated_ms=int(time.time() * 1000),
                    )
                    entry = history_entry(before, after, action, actor, reason, detail or {})
                    _make_new_partitions(self.client, before, after)
                    pipe.multi()
                    pipe.set(key, after.to_json())
                    pipe.set(names.revision_key(name), after.revision)
                    pipe.rpush(names.history_key(name), json.dumps(entry))
                    for role in sorted(set(before.roles) - set(after.roles)):
                        pipe.xgroup_destroy(stream, names.model_group(role))
                    for role in sorted(set(after.roles) - set(before.roles)):
                        pipe.xgroup_destroy(stream, names.model_group(role))  # a stale one
                        pipe.xgroup_create(stream, names.model_group(role), id="$", mkstream=True)
                    results = pipe.execute(raise_on_error=False)
                    break
                except redis.WatchError:
                    continue
        for result in results[3:]:
            if isinstance(result, Exception) and "requires the key to exist" not in str(result):
                raise result
        if len(after.input_streams) > 1:
            # Partitions beyond the first live in other slots, outside the transaction: their
            # groups follow now (a cut-short change is finished by the next ``ensure_groups``),
            # a new role's at each stream's end as on partition 0.
            added = sorted(set(after.roles) - set(before.roles))
            pipe = self.client.pipeline(transaction=False)
            published = set(after.published_streams)
            for stream in after.input_streams[1:]:
                for role in added:
                    pipe.xgroup_create(stream, names.model_group(role), id="$",
                                       mkstream=stream in published)  # fmt: skip
            pipe.execute(raise_on_error=False)  # BUSYGROUP: already there
            ensure_groups(self.client, after)
        return before, after

    def holders_of(self, ref: ModelRef) -> builtins.list[str]:
        """``deployment/role`` for every role ``ref`` holds. Each deployment's state is read
        and written back unchanged in one transaction: a change that read the state before
        (a promote about to give ``ref`` a role) then finds it moved and reads it again,
        meeting whatever the caller marked first (``ModelRegistry.retire``). Without it, a
        delete and a promote of one version at once both succeeded and left real on a
        deleted model (found by a helper's probe)."""
        holders: builtins.list[str] = []
        client: Any = self.client  # redis-py types transaction()'s callable as returning None
        for name in self.list():
            key = names.deployment_key(name)
            touch = functools.partial(_roles_held_rewritten, ref, name, key)
            holders += client.transaction(touch, key, value_from_callable=True)
        return holders

    def note(
        self,
        name: str,
        *,
        action: str,
        actor: str,
        reason: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record something that did not change the state (a refused promotion)."""
        dep = self.get(name)
        entry = history_entry(dep, dep, action, actor, reason, detail or {}, applied=False)
        self.client.rpush(names.history_key(name), json.dumps(entry))
        return entry

    def delete(self, name: str, *, actor: str, reason: str = "") -> Deployment:
        """Take no new request for ``name`` from now on; its readers drain what it accepted,
        then the log bin purges it (``models.deployment_purge``). Returns the deleted state."""
        _, after = self.update(name, deleted, action="delete", actor=actor, reason=reason)
        return after

    def history(self, name: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """Oldest first; with ``limit``, the latest ``limit`` entries."""
        start = -limit if limit else 0
        raw = self.client.lrange(names.history_key(name), start, -1)
        return [json.loads(r) for r in raw]

    def state_at(self, name: str, revision: int) -> dict[str, Any]:
        """Roles and schedule as they were at ``revision`` (from its history entry)."""
        return state_at(self.history(name), name, revision)

    def role_since_ms(self, name: str, role: str) -> float | None:
        """When ``role`` got the model version it holds now (None: since before history)."""
        return role_since_ms(self.history(name), role)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def deleted_message(dep: Deployment) -> str:
    return (f"deployment {dep.name!r} was deleted at {_when(dep.deleted_ms)}; it goes once "
            "what it accepted is drained")  # fmt: skip
