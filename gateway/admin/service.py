"""The admin plane behind ``/admin``: the model registry and every deployment change.

Synchronous on purpose (a Redis client of its own, file writes, onnxruntime loads): the routes
run it in a worker thread, never on the event loop. Failures are typed ``AdminError``s that
carry their HTTP status, so the routes stay one call each.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from gateway.admin.bodies import (
    AddChallenger,
    Conflict,
    CreateDeployment,
    DeploymentPatch,
    EnrichmentPatch,
    Invalid,
    LookupIn,
    NotFound,
    Promote,
    Rollback,
    ScheduleIn,
    TooLarge,
    UploadMeta,
)
from gateway.admin.promotion import Evidence
from models.deployment_store import DeploymentStore
from models.deployments import (
    Deployment,
    DeploymentConflict,
    DeploymentNotFound,
    ModelRef,
    promoted,
    with_challenger,
    with_partitions,
    with_schedule,
    without_challenger,
)
from models.inspection import ArtifactRejected, inspect_onnx
from models.meta import ModelMeta
from models.registry import ModelExists, ModelRegistry
from rendezvous import names
from rendezvous.bus.connection import Client, text
from rendezvous.schedule import Schedule
from rendezvous.spec import FLOAT32_MAX, FeatureSpec, Lookup


def _state(dep: Deployment) -> dict[str, Any]:
    doc = dep.to_dict()
    spec = doc.pop("feature_spec")
    doc["feature_spec"] = {"version": spec["version"], "names": spec["names"]}
    if "lookup" in spec:
        doc["feature_spec"]["lookup"] = spec["lookup"]
    doc["challengers"] = dep.challengers
    return doc


class AdminService:
    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        *,
        default_schedule: Schedule,
        max_model_bytes: int,
        shadow_window: int,
        heartbeat_timeout_s: float,
        labelled_window: int = 1000,
    ):
        self.client = client
        self.registry = registry
        self.store = DeploymentStore(client)
        self.default_schedule = default_schedule
        self.max_model_bytes = max_model_bytes
        self.evidence = Evidence(client, self.store, shadow_window, labelled_window)
        self.heartbeat_timeout_s = heartbeat_timeout_s

    # -- models -------------------------------------------------------------------------------

    def upload(self, meta: UploadMeta, data: bytes, actor: str) -> dict[str, Any]:
        """Check everything first; the registry changes only when the artifact passed."""
        if len(data) > self.max_model_bytes:
            raise TooLarge(
                f"model artifact of {len(data)} bytes is larger than "
                f"RDV_MAX_MODEL_BYTES={self.max_model_bytes}"
            )
        if not data:
            raise Invalid("the model artifact is empty")
        try:
            names.check_name(meta.name, "model name")
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        spec = self._upload_spec(meta)
        draft = ModelMeta(
            name=meta.name,
            version=meta.version or 1,
            feature_spec=spec,
            classes=list(meta.classes or []),
            class_names=list(meta.class_names or []),
            sha256=meta.sha256 or "",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=dict(meta.metrics),
            algorithm=meta.algorithm,
            description=meta.description,
        )
        try:
            checked = inspect_onnx(data, draft)
        except ArtifactRejected as exc:
            raise Invalid(f"refused: {exc}") from None
        try:
            stored = self.registry.add(checked, data, version=meta.version)
        except ModelExists as exc:
            raise Conflict(str(exc)) from None
        return {**stored.summary(), "uploaded_by": actor}

    def _upload_spec(self, meta: UploadMeta) -> FeatureSpec:
        if meta.deployment:
            spec = self._dep(meta.deployment).feature_spec
            if meta.feature_names and tuple(meta.feature_names) != spec.names:
                raise Invalid(f"feature_names differ from deployment {meta.deployment}'s spec")
            return spec
        if meta.feature_names:
            return FeatureSpec.from_names(meta.feature_names)
        earlier = self.registry.list(meta.name)
        if earlier:
            return earlier[-1].feature_spec
        raise Invalid(
            "say which features the model takes: give 'deployment' (its feature "
            "spec) or 'feature_names'"
        )

    def models(self, name: str | None = None) -> list[dict[str, Any]]:
        held = self._holders()
        return [
            {**m.summary(), "roles": held.get(ModelRef(m.name, m.version), [])}
            for m in self.registry.list(name)
        ]

    def model(self, name: str, version: int) -> dict[str, Any]:
        meta = self._meta(ModelRef(name, version))
        try:
            intact = self.registry.verify(name, version)
        except LookupError:
            intact = False
        return {
            **meta.to_dict(),
            "artifact_intact": intact,
            "roles": self._holders().get(ModelRef(name, version), []),
        }

    def delete_model(self, name: str, version: int, actor: str) -> dict[str, Any]:
        ref = ModelRef(name, version)
        self._meta(ref)
        holders = self._holders().get(ref, [])
        if holders:
            raise Conflict(
                f"{ref} holds {', '.join(holders)}; promote or remove it first", roles=holders
            )
        self.registry.delete(name, version)
        return {"deleted": str(ref), "by": actor}

    def _holders(self) -> dict[ModelRef, list[str]]:
        out: dict[ModelRef, list[str]] = {}
        for dep_name in self.store.list():
            try:
                dep = self.store.get(dep_name)
            except DeploymentNotFound:
                continue
            for role, ref in dep.roles.items():
                out.setdefault(ref, []).append(f"{dep_name}/{role}")
        return out

    def _meta(self, ref: ModelRef) -> ModelMeta:
        try:
            names.check_name(ref.name, "model name")
            found = [m for m in self.registry.list(ref.name) if m.version == ref.version]
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if not found:
            raise NotFound(f"model {ref} is not in the registry")
        return found[0]

    def _servable(self, ref: ModelRef, dep: Deployment) -> None:
        """A model that may take a role in ``dep``: registered, artifact present, right width."""
        meta = self._meta(ref)
        if not self.registry.exists(ref.name, ref.version):
            raise Conflict(f"model {ref} is indexed but its artifact is missing")
        if meta.feature_spec.width != dep.feature_spec.width:
            raise Invalid(
                f"model {ref} takes {meta.feature_spec.width} features, deployment "
                f"{dep.name} feeds {dep.feature_spec.width}"
            )

    # -- deployments --------------------------------------------------------------------------

    def deployments(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.list():
            try:
                dep = self.store.get(name)
            except DeploymentNotFound:
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
        live_after = time.time() - self.heartbeat_timeout_s
        workers: dict[str, int] = {}
        members = self.client.zrangebyscore(names.workers_key(name), live_after, "+inf")
        for member in cast(list[bytes], members):
            role = text(member).split("|", 1)[0]
            workers[role] = workers.get(role, 0) + 1
        return {**_state(dep), "live_workers": workers, "input": self.store.input_view(dep)}

    def create_deployment(self, req: CreateDeployment, actor: str) -> dict[str, Any]:
        real = ModelRef(req.real.model, req.real.version)
        roles = {names.REAL: real}
        if req.canary is not None:
            roles[names.CANARY] = ModelRef(req.canary.model, req.canary.version)
        schedule = self.default_schedule
        if req.schedule is not None:
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
            )
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        for ref in roles.values():
            self._servable(ref, dep)
        if not self.store.create(dep, actor=actor, reason=req.reason):
            raise Conflict(f"deployment {req.name} already exists")
        return _state(self.store.get(req.name))

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        self._dep(name)
        return self.store.history(name, limit)

    def shadow(self, name: str) -> dict[str, Any]:
        return self.evidence.shadow(self._dep(name))

    def promote(self, name: str, req: Promote, actor: str) -> dict[str, Any]:
        dep = self._dep(name)
        ref = ModelRef(req.model or dep.roles[names.REAL].name, req.version)
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
        target = req.to_revision or dep.revision - 1
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
        )

    def remove_challenger(self, name: str, role: str, actor: str, reason: str) -> dict[str, Any]:
        dep = self._dep(name)
        if role not in dep.roles:
            raise NotFound(f"deployment {name} has no challenger {role}")
        return self._change(
            name,
            lambda d: without_challenger(d, role),
            "remove-challenger",
            actor,
            reason,
            {"role": role},
        )

    def set_schedule(self, name: str, req: ScheduleIn, actor: str) -> dict[str, Any]:
        changes = req.model_dump(exclude_none=True, exclude={"reason"})
        if not changes:
            raise Invalid("nothing to change: give at least one schedule field")
        self._schedule(self._dep(name).schedule, req)
        return self._change(
            name,
            lambda d: with_schedule(d, changes),
            "set-schedule",
            actor,
            req.reason,
            {"changes": changes},
        )

    def set_partitions(self, name: str, req: DeploymentPatch, actor: str) -> dict[str, Any]:
        """Spread requests over ``req.partitions`` input streams from now on (nothing dropped:
        the readers keep reading every partition there ever was)."""
        detail = {"partitions": [self._dep(name).partitions, req.partitions]}
        change = functools.partial(with_partitions, partitions=req.partitions)
        return self._change(name, change, "set-partitions", actor, req.reason, detail)

    # -- enrichment ---------------------------------------------------------------------------

    def set_enrichment(self, name: str, req: EnrichmentPatch, actor: str) -> dict[str, Any]:
        """Declare (or, with null, drop) the features the deployment looks up by entity; the
        gateways follow within their refresh interval, and the change is in the history."""
        before = self._dep(name).feature_spec
        spec = self._with_lookup(before, req.lookup)
        if spec.lookup == before.lookup:
            raise Conflict(f"{name} already has that lookup")
        detail = {"lookup": [x.to_dict() if x else None for x in (before.lookup, spec.lookup)]}
        return self._change(
            name,
            lambda d: dataclasses.replace(d, feature_spec=d.feature_spec.with_lookup(spec.lookup)),
            "set-enrichment",
            actor,
            req.reason,
            detail,
        )

    def load_entities(self, name: str, rows: list[dict[str, Any]], actor: str) -> dict[str, Any]:
        """Write each entity's features (``{<key>: "c-17", <feature>: number, ...}``) to the
        online store, in one pipelined round trip; the features an entity does not give keep
        their stored values. All or nothing: one bad row refuses the batch, naming it."""
        lookup = self._dep(name).feature_spec.lookup
        if lookup is None:
            raise Conflict(
                f"deployment {name} looks nothing up: declare its lookup first "
                f"(PATCH /admin/deployments/{name}/enrichment)"
            )
        writes, errors = _entity_writes(lookup, rows)
        if errors:
            raise Invalid(
                f"{len(errors)} of {len(rows)} entities refused; nothing was written",
                errors=errors[:10],
            )
        pipe = self.client.pipeline(transaction=False)
        for entity, values in writes:
            pipe.hset(names.entity_key(name, entity), mapping=values)  # type: ignore[arg-type]
        pipe.execute()
        return {"deployment": name, "key": lookup.key, "loaded": len(writes), "by": actor}

    def entity(self, name: str, entity: str) -> dict[str, Any]:
        """One entity's stored features, as the gateway would read them."""
        lookup = self._dep(name).feature_spec.lookup
        if lookup is None:
            raise NotFound(f"deployment {name} looks nothing up")
        stored = self.client.hmget(names.entity_key(name, entity), list(lookup.features))
        values = {f: float(v) for f, v in zip(lookup.features, stored, strict=True) if v}
        if not values:
            raise NotFound(f"{lookup.key} {entity!r} is not in the feature store of {name}")
        return {"deployment": name, lookup.key: entity, "features": values}

    @staticmethod
    def _with_lookup(spec: FeatureSpec, req: LookupIn | None) -> FeatureSpec:
        if req is None:
            return spec.with_lookup(None)
        try:
            lookup = Lookup(req.key, tuple(req.features), dict(req.defaults))
            return spec.with_lookup(lookup)
        except ValueError as exc:
            raise Invalid(f"invalid lookup: {exc}") from None

    # -- internals ----------------------------------------------------------------------------

    def _dep(self, name: str) -> Deployment:
        try:
            return self.store.get(names.check_name(name, "deployment"))
        except ValueError as exc:
            raise NotFound(str(exc)) from None
        except DeploymentNotFound as exc:
            raise NotFound(str(exc)) from None

    @staticmethod
    def _schedule(base: Schedule, req: ScheduleIn) -> Schedule:
        try:
            return base.updated(req.model_dump(exclude_none=True, exclude={"reason"}))
        except ValueError as exc:
            raise Invalid(f"invalid schedule: {exc}") from None

    def _change(
        self,
        name: str,
        change: Callable[[Deployment], Deployment],
        action: str,
        actor: str,
        reason: str,
        detail: dict[str, Any],
        expect_revision: int | None = None,
    ) -> dict[str, Any]:
        try:
            before, after = self.store.update(
                name,
                change,
                action=action,
                actor=actor,
                reason=reason,
                detail=detail,
                expect_revision=expect_revision,
            )
        except DeploymentNotFound as exc:
            raise NotFound(str(exc)) from None
        except DeploymentConflict as exc:
            raise Conflict(str(exc)) from None
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return {
            "action": action,
            "revision": after.revision,
            "previous_revision": before.revision,
            "detail": detail,
            "deployment": _state(after),
        }


def _entity_writes(
    lookup: Lookup, rows: list[dict[str, Any]]
) -> tuple[list[tuple[str, dict[str, float]]], list[dict[str, Any]]]:
    """(entity, values) per row, and what is wrong with the rows that are not right."""
    known = set(lookup.features)
    writes: list[tuple[str, dict[str, float]]] = []
    errors: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        entity = row.get(lookup.key)
        values = {k: v for k, v in row.items() if k != lookup.key}
        problems = []
        if not isinstance(entity, str) or not names.ENTITY_PATTERN.fullmatch(entity):
            problems.append(f"{lookup.key} must be 1-128 characters of A-Z, a-z, 0-9 and ._:@+=/-")
        unknown = [k for k in values if k not in known]
        if unknown:
            problems.append(f"not looked-up features: {unknown[:5]}")
        if not values:
            problems.append("no feature")
        for k, v in values.items():
            if k in known and not _finite_float32(v):
                problems.append(f"{k!r} is not a finite float32 number")
        if problems:
            errors.append({"row": i, lookup.key: str(entity)[:130], "msg": "; ".join(problems)})
        else:
            writes.append((str(entity), {k: float(v) for k, v in values.items()}))
    return writes, errors


def _finite_float32(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= FLOAT32_MAX  # NaN compares False
