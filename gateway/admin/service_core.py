"""What every admin operation stands on: the Redis client, the model registry, the deployment
store and the settings the operations read, and the few steps they all share: finding a
deployment or a registered model by name, building a feature lookup from its request body, and
making a deployment change through the store (recorded in the history) with its failures turned
into typed ``AdminError``s. The operations themselves live in ``model_operations``,
``deployment_operations`` and ``enrichment_operations``; ``service`` puts them together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from gateway.admin.bodies import Conflict, Invalid, LookupIn, NotFound
from gateway.admin.promotion import Evidence
from models.deployment_store import DeploymentStore, deleted_message
from models.deployments import Deployment, DeploymentConflict, DeploymentNotFound, ModelRef
from models.meta import ModelMeta
from models.registry import ModelRegistry
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.input_types import deployment_types
from rendezvous.schedule import Schedule
from rendezvous.spec import WHOLE_INPUT, FeatureSpec, Lookup


def deployment_state(dep: Deployment) -> dict[str, Any]:
    """A deployment as the admin API shows it: its feature spec cut to version, names and
    lookup, and its challengers."""
    doc = dep.to_dict()
    spec = doc.pop("feature_spec")
    doc["feature_spec"] = {"version": spec["version"], "names": spec["names"]}
    if "lookup" in spec:
        doc["feature_spec"]["lookup"] = spec["lookup"]
    doc["challengers"] = dep.challengers
    return doc


class AdminCore:
    """The state and the shared steps of the admin operations (synchronous: see
    ``gateway.admin.service``)."""

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

    def _input_types(self, refs: Iterable[ModelRef]) -> tuple[str, ...]:
        """What a deployment with these role models records of their input types: the
        gateway validates and carries its rows so that each takes them unchanged."""
        return deployment_types(self._meta(ref).input_type for ref in refs)

    def _meta(self, ref: ModelRef) -> ModelMeta:
        try:
            names.check_name(ref.name, "model name")
            found = [m for m in self.registry.list(ref.name) if m.version == ref.version]
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if not found:
            raise NotFound(f"model {ref} is not in the registry")
        return found[0]

    @staticmethod
    def _with_lookup(spec: FeatureSpec, req: LookupIn | None) -> FeatureSpec:
        if req is None:
            return spec.with_lookup(None)
        if req.key in req.features:  # the key column of a load is the entity, never a value
            raise Invalid(f"invalid lookup: its key {req.key!r} is also a looked-up feature")
        if req.key in spec.names:  # an Open Inference Protocol input of each name: two of one
            raise Invalid(f"invalid lookup: its key {req.key!r} is the name of a feature the "
                          "caller sends; name the key otherwise")  # fmt: skip
        if req.key == WHOLE_INPUT:  # and the one input of every feature (a helper's probe)
            raise Invalid(f"invalid lookup: its key may not be {WHOLE_INPUT!r}, the Open "
                          "Inference Protocol's name of the input of every feature; name the key "
                          "otherwise")  # fmt: skip
        try:
            lookup = Lookup(req.key, tuple(req.features), dict(req.defaults))
            return spec.with_lookup(lookup)
        except ValueError as exc:
            raise Invalid(f"invalid lookup: {exc}") from None

    def require(self, name: str) -> None:
        """404 unless the deployment exists and is not deleted, as Redis says now (a gateway's
        cache follows a create made through another process within a second)."""
        self._dep(name)

    def _dep(self, name: str) -> Deployment:
        names.check_name(name, "deployment")  # InvalidName: 422, as on every route
        try:
            dep = self.store.get(name)
        except DeploymentNotFound as exc:
            raise NotFound(str(exc)) from None
        if dep.deleted_ms:
            raise NotFound(deleted_message(dep))
        return dep

    def _refuse_retired(self, refs: Iterable[ModelRef]) -> None:
        """404 for a version deleted (or being deleted) since the operation checked it."""
        for ref in refs:
            if self.registry.retired(ref.name, ref.version):
                raise NotFound(f"model {ref.name} version {ref.version} was deleted")

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
        def unless_retired(dep: Deployment) -> Deployment:
            """The change, refused where it gives a role a version deleted (or being deleted)
            since it was checked: read inside the state's transaction, which a deletion
            rewrites after marking the version (``DeploymentStore.holders_of``)."""
            changed = change(dep)
            self._refuse_retired(set(changed.roles.values()) - set(dep.roles.values()))
            if changed.roles != dep.roles:
                types = self._input_types(changed.roles.values())
                changed = dataclasses.replace(changed, input_types=types)
            return changed

        try:
            before, after = self.store.update(
                name,
                unless_retired,
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
            "deployment": deployment_state(after),
        }
