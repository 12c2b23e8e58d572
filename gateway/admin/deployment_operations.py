"""The deployment operations of the admin API: list and show deployments (with their live
workers), create one, read its history and shadow record, and every change of its roles or
schedule: promote (behind the evidence gate of ``gateway.admin.promotion``), roll back, add or
remove a challenger, set the schedule, set the number of input partitions.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, cast

from gateway.admin.bodies import (
    AddChallenger,
    Conflict,
    CreateDeployment,
    DeploymentPatch,
    Invalid,
    NotFound,
    Promote,
    Rollback,
    ScheduleIn,
    SchedulePatch,
)
from gateway.admin.service_core import AdminCore, deployment_state
from gateway.observability.cluster_state import fresh_stats
from models.deployments import (
    Deployment,
    DeploymentConflict,
    ModelRef,
    deleted,
    promoted,
    with_challenger,
    with_partitions,
    with_schedule,
    without_challenger,
)
from models.meta import unfit_for
from models.worker_versions import stale_workers
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.bus.connection import text
from rendezvous.schedule import Schedule


def _at_revision(dep: Deployment, expect_revision: int | None) -> None:
    """409 unless ``dep`` is at ``expect_revision`` (when given), before the change is looked
    at: the store checks it again as it commits (``DeploymentStore.update``)."""
    if expect_revision is not None and dep.revision != expect_revision:
        raise Conflict(f"{dep.name} is at revision {dep.revision}, not {expect_revision}")


class DeploymentOperations(AdminCore):
    """``/admin/deployments``: what a deployment is, and every change of its roles, schedule
    and partitions."""

    def deployments(self) -> list[dict[str, Any]]:
        out = []
        for name, dep in sorted(self.store.current({}).items()):  # unreadable ones left out
            if dep.deleted_ms:  # draining before its purge: no longer a deployment to callers
                continue
            out.append(
                {
                    "name": name,
                    "revision": dep.revision,
                    "roles": {r: str(m) for r, m in dep.roles.items()},
                }
            )
        return out

    def deployment(self, name: str) -> dict[str, Any]:
        dep = self._dep(name)
        workers: dict[str, int] = {}  # live by Redis's clock: the workers' hosts' may differ
        args = clock.live_members_args(names.workers_key(name), self.heartbeat_timeout_s)
        members = self.client.eval(*args)  # (a cluster's pipeline takes no EVAL: a 500)
        stats = cast(dict[bytes, bytes], self.client.hgetall(names.stats_key(name)))
        live = [text(member) for member in cast(list[bytes], members)]
        for member in live:
            role = member.split("|", 1)[0]
            workers[role] = workers.get(role, 0) + 1
        return {
            **deployment_state(dep),
            "live_workers": workers,
            "stale_workers": stale_workers(dep.roles, live, fresh_stats(stats, time.time(), [])),
            "input": self.store.input_view(dep),
        }

    def create_deployment(self, req: CreateDeployment, actor: str) -> dict[str, Any]:
        real = ModelRef(req.real.model, req.real.version)
        roles = {names.REAL: real}
        if req.canary is not None:
            roles[names.CANARY] = ModelRef(req.canary.model, req.canary.version)
        schedule = self.default_schedule
        if req.schedule is not None:
            _known_fallbacks(req.schedule, set(roles), req.name)
            schedule = self._schedule(schedule, req.schedule)
        spec = self._meta(real).feature_spec
        if req.lookup is not None:
            spec = self._with_lookup(spec, req.lookup)
        try:
            dep = Deployment(
                name=req.name,
                roles=roles,
                feature_spec=spec,
                schedule=schedule,
                partitions=req.partitions,
                input_types=self._input_types(roles.values()),
            )
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        for ref in roles.values():
            self._servable(ref, dep)
        try:
            created = self.store.create(
                dep,
                actor=actor,
                reason=req.reason,
                check=lambda written: self._refuse_retired(written.roles.values()),
            )
        except DeploymentConflict as exc:  # deleted, and still draining
            raise Conflict(str(exc)) from None
        if not created:
            raise Conflict(f"deployment {req.name} already exists")
        return deployment_state(self.store.get(req.name))

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Also of a deployment deleted since: its history stays."""
        found = self.store.history(name, limit) if names.NAME_PATTERN.fullmatch(name) else []
        if not found:
            self._dep(name)  # 404 naming why
        return found

    def shadow(self, name: str) -> dict[str, Any]:
        return self.evidence.shadow(self._dep(name))

    def promote(self, name: str, req: Promote, actor: str) -> dict[str, Any]:
        dep = self._dep(name)
        ref = ModelRef(req.model or dep.roles[names.REAL].name, req.version)
        if ref == dep.roles[names.REAL]:  # said before the gate: it judged real against itself
            raise Conflict(f"{ref} is already the real model of {name}")
        self._servable(ref, dep)
        detail: dict[str, Any] = {
            "version": str(ref),
            "pin_canary": req.pin_canary,
            "force": req.force,
        }
        gate = self.evidence.gate(dep, ref, req)
        if gate is not None:
            shortfalls = gate["shortfalls"]
            detail["gate"] = {**gate, "forced": bool(shortfalls and req.force)}
            if shortfalls and not req.force:
                self.store.note(
                    name, action="promote-refused", actor=actor, reason=req.reason, detail=detail
                )
                raise Conflict(
                    f"{ref} is not promoted: {'; '.join(shortfalls)} (force to promote anyway)",
                    gate=detail["gate"],
                )
        return self._change(
            name,
            lambda d: promoted(d, ref, pin_canary=req.pin_canary),
            "promote",
            actor,
            req.reason,
            detail,
            req.expect_revision,
        )

    def rollback(self, name: str, req: Rollback, actor: str) -> dict[str, Any]:
        dep = self._dep(name)
        _at_revision(dep, req.expect_revision)  # what a plain rollback undoes depends on it
        target = req.to_revision or self._previous_setup(dep)
        if not 1 <= target < dep.revision:
            raise Conflict(
                f"{name} is at revision {dep.revision}: no revision {target} to roll back to"
            )
        try:
            state = self.store.state_at(name, target)
        except DeploymentConflict as exc:
            raise Conflict(str(exc)) from None
        roles = {r: ModelRef.from_dict(m) for r, m in state["roles"].items()}
        for ref in roles.values():
            if not self.registry.exists(ref.name, ref.version):
                raise Conflict(f"revision {target} needs {ref}, which is no longer in the registry")
            self._unchanged_on_disk(ref, f"revision {target} needs {ref}, whose")
        schedule = Schedule.from_dict(state["schedule"])
        return self._change(
            name,
            lambda d: dataclasses.replace(d, roles=roles, schedule=schedule),
            "rollback",
            actor,
            req.reason,
            {"to_revision": target},
            dep.revision,
        )

    def _previous_setup(self, dep: Deployment) -> int:
        """The latest earlier revision whose roles or schedule differ from now: what a plain
        rollback restores. (The revision just before may differ only in partitions: restoring
        it changed nothing, and a promotion stayed.)"""
        now = {"roles": {r: m.to_dict() for r, m in dep.roles.items()},
               "schedule": dep.schedule.to_dict()}  # fmt: skip
        for entry in reversed(self.store.history(dep.name)):
            setup = {"roles": entry["roles"], "schedule": entry["schedule"]}
            if entry.get("applied", True) and entry["revision"] < dep.revision and setup != now:
                return int(entry["revision"])
        raise Conflict(
            f"{dep.name}: no earlier revision has other roles or another schedule: nothing to "
            "roll back"
        )

    def add_challenger(self, name: str, req: AddChallenger, actor: str) -> dict[str, Any]:
        dep = self._dep(name)
        ref = ModelRef(req.model or dep.roles[names.REAL].name, req.version)
        self._servable(ref, dep)
        detail = {"role": req.role, "version": str(ref), "split": req.split}
        return self._change(
            name,
            lambda d: with_challenger(d, req.role, ref, req.split),
            "add-challenger",
            actor,
            req.reason,
            detail,
            req.expect_revision,
        )

    def delete_deployment(self, name: str, actor: str, reason: str) -> dict[str, Any]:
        """No new request from now on (404); what it accepted is still answered, scored and
        archived, then the log bin purges it (``models.deployment_purge``)."""
        self._dep(name)
        return self._change(name, deleted, "delete", actor, reason, {})

    def remove_challenger(
        self, name: str, role: str, actor: str, reason: str, expect_revision: int | None = None
    ) -> dict[str, Any]:
        dep = self._dep(name)
        _at_revision(dep, expect_revision)
        if role not in dep.roles:
            raise NotFound(f"deployment {name} has no challenger {role}")
        return self._change(
            name,
            lambda d: without_challenger(d, role),
            "remove-challenger",
            actor,
            reason,
            {"role": role},
            expect_revision,
        )

    def set_schedule(self, name: str, req: SchedulePatch, actor: str) -> dict[str, Any]:
        changes = req.model_dump(exclude_none=True, exclude={"reason", "expect_revision"})
        if not changes:
            raise Invalid("nothing to change: give at least one schedule field")
        dep = self._dep(name)
        _known_fallbacks(req, set(dep.roles), name)
        self._schedule(dep.schedule, req)

        def change(d: Deployment) -> Deployment:
            # Again on the state the change applies to: a challenger removed meanwhile stayed
            # named a fallback (found by a helper's probe of concurrent changes).
            _known_fallbacks(req, set(d.roles), name)
            return with_schedule(d, changes)

        return self._change(
            name,
            change,
            "set-schedule",
            actor,
            req.reason,
            {"changes": changes},
            req.expect_revision,
        )

    def set_partitions(self, name: str, req: DeploymentPatch, actor: str) -> dict[str, Any]:
        """Spread requests over ``req.partitions`` input streams from now on (nothing dropped:
        the readers keep reading every partition there ever was)."""
        detail = {"partitions": [self._dep(name).partitions, req.partitions]}
        change = functools.partial(with_partitions, partitions=req.partitions)
        return self._change(name, change, "set-partitions", actor, req.reason, detail,
                            req.expect_revision)  # fmt: skip

    def _servable(self, ref: ModelRef, dep: Deployment) -> None:
        """A model that may take a role in ``dep``: registered, artifact present, the
        deployment's features in its order, the real model's classes (``unfit_for``)."""
        meta = self._meta(ref)
        if not self.registry.exists(ref.name, ref.version):
            raise Conflict(f"model {ref} is indexed but its artifact is missing")
        self._unchanged_on_disk(ref, f"model {ref}: the")
        real = self._meta(dep.roles[names.REAL])
        why = unfit_for(meta, dep.feature_spec, real.classes)
        if why is not None:
            raise Invalid(f"{why} (deployment {dep.name})")

    def _unchanged_on_disk(self, ref: ModelRef, said: str) -> None:
        """Its workers would refuse an artifact whose sha256 is not the upload's, and the
        fallbacks would answer for good: a role for it is refused here, naming why."""
        if not self.registry.verify(ref.name, ref.version):
            raise Conflict(
                f"{said} artifact on disk is not the one uploaded (its sha256 differs): put the "
                "original back, or upload it again"
            )

    @staticmethod
    def _schedule(base: Schedule, req: ScheduleIn) -> Schedule:
        try:
            fields = req.model_dump(exclude_none=True, exclude={"reason", "expect_revision"})
            return base.updated(fields)
        except ValueError as exc:
            raise Invalid(f"invalid schedule: {exc}") from None


def _known_fallbacks(req: ScheduleIn, roles: set[str], deployment: str) -> None:
    """Fallbacks an operator names are roles of the deployment, each once: a misspelt one
    would never answer, unseen. (A challenger that leaves leaves the fallbacks too; only
    ``RDV_FALLBACKS``'s ``canary`` may name a role a deployment does not have.)"""
    given = req.fallbacks or []
    for role in given:
        if given.count(role) > 1:
            raise Invalid(f"invalid schedule: fallback {role[:64]!r} is named twice")
        if role not in roles:
            raise Invalid(
                f"invalid schedule: fallback {role[:64]!r} is not a role of {deployment} "
                f"(roles: {', '.join(sorted(roles))})"
            )
