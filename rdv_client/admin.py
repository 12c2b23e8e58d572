"""The admin calls, the same for the sync and the async client: each is one request to
``/admin``, and what it returns is the gateway's JSON object (the async client's, an awaitable
of it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import quote


def segment(name: str) -> str:
    """``name`` as one path segment (a deployment, a role, a job id)."""
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

    def remove_challenger(self, deployment: str, role: str) -> Doc:
        return self._admin(
            "DELETE", f"/deployments/{segment(deployment)}/challengers/{segment(role)}"
        )

    def set_schedule(self, deployment: str, **changes: Any) -> Doc:
        return self._admin("PATCH", f"/deployments/{segment(deployment)}/schedule", json=changes)

    def set_partitions(self, deployment: str, partitions: int, reason: str = "") -> Doc:
        return self._admin("PATCH", f"/deployments/{segment(deployment)}",
                           json={"partitions": partitions, "reason": reason})  # fmt: skip

    def models(self) -> Doc:
        return self._admin("GET", "/models")
