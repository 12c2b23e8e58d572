"""The admin calls, the same for the sync and the async client: each is one request to
``/admin``, and what it returns is the gateway's JSON object (the async client's, an awaitable
of it)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import quote


def segment(name: str) -> str:
    """``name`` as one path segment (a deployment, a role, a job id). A dot segment is
    escaped too: httpx resolves ``..`` in a path, so ``remove_challenger(d, "..")`` was a
    DELETE of the deployment itself; an empty name would name the collection."""
    if not name:
        raise ValueError("an empty name cannot be a path segment")
    if name in (".", ".."):
        return name.replace(".", "%2E")
    return quote(name, safe="")


Doc = TypeVar("Doc")
"""What an admin call returns: the gateway's JSON object, or (async) an awaitable of it."""


class AdminCalls(Generic[Doc]):
    """The admin calls, the same for both clients: each returns the gateway's JSON object
    (the async client's, an awaitable of it)."""

    def _admin(self, method: str, path: str, json: Any = None,
               params: Mapping[str, Any] | None = None) -> Doc:  # fmt: skip
        raise NotImplementedError

    def deployments(self) -> Doc:
        return self._admin("GET", "/deployments")

    def deployment(self, deployment: str) -> Doc:
        return self._admin("GET", f"/deployments/{segment(deployment)}")

    def create_deployment(self, deployment: str, model: str, version: int,
                          **options: Any) -> Doc:  # fmt: skip
        """``options``: ``canary`` ({"model", "version"}), ``schedule``, ``partitions``,
        ``lookup``, ``reason``."""
        real = {"model": model, "version": version}
        return self._admin("POST", "/deployments", json={"name": deployment, "real": real,
                                                          **options})  # fmt: skip

    def delete_deployment(self, deployment: str, reason: str = "") -> Doc:
        """No new request from now on; what it accepted is drained, then it is purged."""
        return self._admin("DELETE", f"/deployments/{segment(deployment)}",
                           params={"reason": reason})  # fmt: skip

    def history(self, deployment: str, limit: int = 50) -> Doc:
        return self._admin("GET", f"/deployments/{segment(deployment)}/history",
                           params={"limit": limit})  # fmt: skip

    def promote(self, deployment: str, version: int, **options: Any) -> Doc:
        return self._admin("POST", f"/deployments/{segment(deployment)}/promote",
                           json={"version": version, **options})  # fmt: skip

    def rollback(self, deployment: str, **options: Any) -> Doc:
        return self._admin("POST", f"/deployments/{segment(deployment)}/rollback", json=options)

    def add_challenger(self, deployment: str, role: str, version: int, **options: Any) -> Doc:
        return self._admin("POST", f"/deployments/{segment(deployment)}/challengers",
                           json={"role": role, "version": version, **options})  # fmt: skip

    def remove_challenger(self, deployment: str, role: str, reason: str = "",
                          expect_revision: int | None = None) -> Doc:  # fmt: skip
        """``expect_revision``: refused (409) unless the deployment is still at that revision
        (``promote``, ``rollback``, ``add_challenger`` and ``set_schedule`` take it too)."""
        params: dict[str, Any] = {"reason": reason}
        if expect_revision is not None:
            params["expect_revision"] = expect_revision
        return self._admin(
            "DELETE", f"/deployments/{segment(deployment)}/challengers/{segment(role)}",
            params=params,
        )  # fmt: skip

    def set_schedule(self, deployment: str, **changes: Any) -> Doc:
        return self._admin("PATCH", f"/deployments/{segment(deployment)}/schedule", json=changes)

    def set_partitions(self, deployment: str, partitions: int, reason: str = "",
                       expect_revision: int | None = None) -> Doc:  # fmt: skip
        """``expect_revision`` (as with promote, challengers and the schedule): refused (409)
        unless the deployment is still at that revision."""
        body: dict[str, Any] = {"partitions": partitions, "reason": reason}
        if expect_revision is not None:
            body["expect_revision"] = expect_revision
        return self._admin("PATCH", f"/deployments/{segment(deployment)}", json=body)

    def set_enrichment(self, deployment: str, lookup: Mapping[str, Any] | None,
                       reason: str = "") -> Doc:  # fmt: skip
        """``lookup``: ``{"key", "features", "defaults"}`` read from the online store by
        entity; None: look nothing up."""
        return self._admin("PATCH", f"/deployments/{segment(deployment)}/enrichment",
                           json={"lookup": lookup, "reason": reason})  # fmt: skip

    def load_entities(self, deployment: str, entities: Sequence[Mapping[str, Any]]) -> Doc:
        """Entities' features into the online store, each ``{key: id, feature: value, ...}``;
        all or nothing."""
        return self._admin("PUT", f"/deployments/{segment(deployment)}/entities",
                           json=list(entities))  # fmt: skip

    def entity(self, deployment: str, key: str) -> Doc:
        return self._admin("GET", f"/deployments/{segment(deployment)}/entities/{segment(key)}")

    def delete_entity(self, deployment: str, key: str) -> Doc:
        """Remove one entity from the online store (404 if it holds none)."""
        return self._admin("DELETE", f"/deployments/{segment(deployment)}/entities/{segment(key)}")

    def shadow(self, deployment: str) -> Doc:
        """Each non-real role's record against real over the recent decision records."""
        return self._admin("GET", f"/deployments/{segment(deployment)}/shadow")

    def drift_thresholds(self, deployment: str) -> Doc:
        return self._admin("GET", f"/deployments/{segment(deployment)}/drift/thresholds")

    def set_drift_thresholds(self, deployment: str, **changes: Any) -> Doc:
        """Change some thresholds; the rest keep their value."""
        return self._admin("PUT", f"/deployments/{segment(deployment)}/drift/thresholds",
                           json=changes)  # fmt: skip

    def start_replay(self, deployment: str, version: int, **selection: Any) -> Doc:
        """Score ``version`` on archived records; ``selection``: ``model``, ``last``,
        ``from_`` and ``to`` (ISO-8601 or epoch ms), ``positions``. The report, with its
        ``id``."""
        if "from_" in selection:
            selection["from"] = selection.pop("from_")
        return self._admin("POST", f"/deployments/{segment(deployment)}/replays",
                           json={"version": version, **selection})  # fmt: skip

    def replays(self, deployment: str, limit: int = 20) -> Doc:
        return self._admin("GET", f"/deployments/{segment(deployment)}/replays",
                           params={"limit": limit})  # fmt: skip

    def replay(self, deployment: str, replay_id: str) -> Doc:
        """A replay's report: its progress, and its figures once ``done``."""
        return self._admin("GET", self._replay(deployment, replay_id))

    def cancel_replay(self, deployment: str, replay_id: str) -> Doc:
        return self._admin("POST", f"{self._replay(deployment, replay_id)}/cancel")

    def resume_replay(self, deployment: str, replay_id: str) -> Doc:
        return self._admin("POST", f"{self._replay(deployment, replay_id)}/resume")

    @staticmethod
    def _replay(deployment: str, replay_id: str) -> str:
        return f"/deployments/{segment(deployment)}/replays/{segment(replay_id)}"

    def upload_model(self, name: str, onnx: bytes, **metadata: Any) -> Doc:
        """A new version of ``name`` from an ONNX file's bytes; ``metadata``: ``version``
        (default: the next free one), ``deployment`` (check the width against it),
        ``feature_names``, ``classes``, ``class_names``, ``metrics``, ``algorithm``,
        ``description``, ``sha256``, ``reference`` (held-out rows: ``{"columns", "rows"}``)."""
        body = {"name": name, **metadata, "onnx_base64": base64.b64encode(onnx).decode()}
        return self._admin("POST", "/models", json=body)

    def models(self, name: str | None = None) -> Doc:
        """Every model version (or those of ``name``), with the roles each holds."""
        return self._admin("GET", "/models", params={"name": name} if name else None)

    def model(self, name: str, version: int) -> Doc:
        """One version's metadata, sha256 and roles."""
        return self._admin("GET", f"/models/{segment(name)}/{version}")

    def delete_model(self, name: str, version: int) -> Doc:
        """Only a version that holds no role in any deployment."""
        return self._admin("DELETE", f"/models/{segment(name)}/{version}")
