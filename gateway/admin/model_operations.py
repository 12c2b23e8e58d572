"""The model registry operations of the admin API: upload a model version (checked in
onnxruntime before the registry changes), list and show versions with the deployment roles they
hold, and delete a version that holds none.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from gateway.admin.bodies import Conflict, Invalid, NotFound, TooLarge, UploadMeta
from gateway.admin.service_core import AdminCore
from models.deployments import DeploymentNotFound, DeploymentUnreadable, ModelRef
from models.inspection import ArtifactRejected
from models.isolated_inspection import inspect_isolated
from models.meta import ModelMeta
from models.registry import ModelExists, sha256_hex
from rendezvous import names
from rendezvous.spec import FeatureSpec


class ModelOperations(AdminCore):
    """``/admin/models``: uploads, listings and deletions of model versions."""

    def upload(self, meta: UploadMeta, data: bytes, actor: str) -> dict[str, Any]:
        """Check everything first; the registry changes only when the artifact passed."""
        if len(data) > self.max_model_bytes:
            raise TooLarge(  # no size: a multipart part is read up to one byte past the cap
                f"the model artifact is larger than RDV_MAX_MODEL_BYTES={self.max_model_bytes}"
            )
        if not data:
            raise Invalid("the model artifact is empty")
        try:
            names.check_name(meta.name, "model name")
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if meta.sha256 and meta.sha256.lower() != (digest := sha256_hex(data)):
            raise Invalid(f"sha256 {meta.sha256} does not match the artifact's, {digest}")
        spec = self._upload_spec(meta)
        reference = self._reference(meta, spec)
        if reference is not None and not meta.deployment:  # its own features: their statistics
            from models.reference import training_spec

            spec = training_spec(list(spec.names), reference, spec.lookup)
        draft = ModelMeta(
            name=meta.name,
            version=meta.version or 1,
            feature_spec=spec,
            classes=list(meta.classes or []),
            class_names=list(meta.class_names or []),
            sha256=(meta.sha256 or "").lower(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=dict(meta.metrics),
            algorithm=meta.algorithm,
            description=meta.description,
        )
        try:
            checked = inspect_isolated(data, draft, reference=reference)
        except ArtifactRejected as exc:
            raise Invalid(f"refused: {exc}") from None
        if not meta.class_names:
            checked = self._names_of_predecessor(checked, meta.deployment)
        try:
            stored = self.registry.add(checked, data, version=meta.version)
        except ModelExists as exc:
            raise Conflict(str(exc)) from None
        return {**stored.summary(), "uploaded_by": actor}

    def _names_of_predecessor(self, checked: ModelMeta, deployment: str | None) -> ModelMeta:
        """A version uploaded without ``class_names`` takes those of the model it follows (the
        deployment's real model when the upload names one, else the name's latest version)
        when its classes are the same: named ``"0"``, ``"1"`` instead, its promotion turned
        every label sent by name into a 422, for requests the old version answered too (a
        helper's probe)."""
        before: ModelMeta | None = None
        with contextlib.suppress(NotFound, LookupError, ValueError, OSError):
            if deployment:
                real = self._dep(deployment).roles[names.REAL]
                before = self.registry.meta(real.name, real.version)
            elif earlier := self.registry.list(checked.name):
                before = earlier[-1]
        if before is None or list(before.classes) != list(checked.classes):
            return checked
        return ModelMeta.from_dict({**checked.to_dict(), "class_names": before.class_names})

    def _upload_spec(self, meta: UploadMeta) -> FeatureSpec:
        if meta.deployment:
            spec = self._dep(meta.deployment).feature_spec
            if meta.feature_names and tuple(meta.feature_names) != spec.names:
                raise Invalid(f"feature_names differ from deployment {meta.deployment}'s spec")
            return spec
        if meta.feature_names:
            try:
                return FeatureSpec.from_names(meta.feature_names)
            except ValueError as exc:  # names repeated
                raise Invalid(f"feature_names: {exc}") from None
        earlier = self.registry.list(meta.name)
        if earlier:
            return earlier[-1].feature_spec
        raise Invalid(
            "say which features the model takes: give 'deployment' (its feature "
            "spec) or 'feature_names'"
        )

    @staticmethod
    def _reference(meta: UploadMeta, spec: FeatureSpec) -> Any:
        """The reference rows as a float64 matrix in the spec's feature order, or None."""
        if meta.reference is None:
            return None
        import numpy as np

        from models.reference import MIN_ROWS

        ref = meta.reference
        where = {name: i for i, name in enumerate(ref.columns)}
        missing = [n for n in spec.names if n not in where]
        if missing:
            raise Invalid(f"reference: no column for features {missing[:5]} "
                          f"({len(missing)} of {spec.width})")  # fmt: skip
        if len(ref.rows) < MIN_ROWS:
            raise Invalid(f"reference: {len(ref.rows)} rows; give at least {MIN_ROWS}")
        short = next((i for i, row in enumerate(ref.rows) if len(row) != len(ref.columns)), None)
        if short is not None:
            raise Invalid(f"reference: row {short} has {len(ref.rows[short])} values for "
                          f"{len(ref.columns)} columns")  # fmt: skip
        x = np.asarray(ref.rows, dtype=np.float64)[:, [where[n] for n in spec.names]]
        # the statistics are of float32 values, as the gateway sees them: 1e39 was infinite
        # there, and the training centre of an infinite column a 500 (found by a fuzzing probe)
        beyond = np.argwhere(np.abs(x) > np.finfo(np.float32).max)
        if len(beyond):
            row, col = (int(i) for i in beyond[0])
            raise Invalid(
                f"reference: row {row}, {spec.names[col]!r}: {x[row, col]:g} is beyond "
                "float32's range (live values must be finite float32 numbers)"
            )
        return x

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
        marked = self.registry.retire(name, version)  # no role takes it from now on
        try:
            holders = self.store.holders_of(ref)
        except BaseException:
            if marked:
                self.registry.unretire(name, version)
            raise
        if holders:
            if marked:
                self.registry.unretire(name, version)
            raise Conflict(self._held(ref, holders), roles=holders)
        try:
            self.registry.delete(name, version)
        except OSError:  # the disk refused the version's marker: nothing was deleted
            if marked:
                self.registry.unretire(name, version)
            raise
        return {"deleted": str(ref), "by": actor}

    def _held(self, ref: ModelRef, holders: list[str]) -> str:
        """Why ``ref`` cannot go: a deployment deleted and still draining holds it only until
        its purge, where "promote or remove it first" named what a deleted one refuses."""
        draining = set()
        for deployment in {holder.split("/", 1)[0] for holder in holders}:
            with contextlib.suppress(DeploymentNotFound, DeploymentUnreadable):
                if self.store.get(deployment).deleted_ms:
                    draining.add(deployment)
        if draining and all(holder.split("/", 1)[0] in draining for holder in holders):
            return (
                f"{ref} holds {', '.join(holders)} of deleted deployment"
                f"{'s' if len(draining) > 1 else ''} {', '.join(sorted(draining))}, still "
                "draining what it accepted: it is free once purged (RDV_DRAIN_GRACE_S after "
                "the delete, once its input is read); try again then"
            )
        return f"{ref} holds {', '.join(holders)}; promote or remove it first"

    def _holders(self) -> dict[ModelRef, list[str]]:
        out: dict[ModelRef, list[str]] = {}
        for dep_name, dep in sorted(self.store.current({}).items()):  # unreadable: left out
            for role, ref in dep.roles.items():
                out.setdefault(ref, []).append(f"{dep_name}/{role}")
        return out
