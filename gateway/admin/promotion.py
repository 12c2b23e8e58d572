"""Promotion on evidence: what each non-real role did on the latest live requests (its shadow
record, from the decision records) and the gate a promotion may demand of it.

The record itself is computed in the vocabulary (``rendezvous.evidence``) from typed decision
records; the role changes a promotion makes are the deployment state's (``models.deployments``
``promoted``); this module reads the evidence from Redis and judges it for the admin service.
"""

from __future__ import annotations

from typing import Any

from models.deployment_store import DeploymentStore
from models.deployments import Deployment, ModelRef
from rendezvous import names
from rendezvous.bus.connection import Client
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.evidence import ShadowRecord, shadow_record


class Evidence:
    def __init__(self, client: Client, store: DeploymentStore, shadow_window: int):
        self.client = client
        self.store = store
        self.shadow_window = shadow_window
        """How many of the latest decision records a shadow record looks at."""

    def shadow(self, dep: Deployment) -> dict[str, Any]:
        """The shadow record of every role but real."""
        records = self._records(dep.name)
        return {
            "window": len(records),
            "roles": {
                role: self._shadow_of(dep, role, dep.roles[role], records).to_dict()
                for role in dep.role_names
                if role != names.REAL
            },
        }

    def gate(
        self,
        dep: Deployment,
        candidate: ModelRef,
        min_shadow_requests: int | None,
        max_disagreement: float | None,
    ) -> dict[str, Any] | None:
        """None when no evidence is demanded; else the figures and what falls short (an
        empty ``shortfalls``: the candidate may be promoted)."""
        if not min_shadow_requests and max_disagreement is None:
            return None
        holder = dep.role_of(candidate)
        record = self._shadow_of(dep, holder or "candidate", candidate, self._records(dep.name))
        return {
            "min_shadow_requests": min_shadow_requests,
            "max_disagreement": max_disagreement,
            "shadow": record.to_dict(),
            "shortfalls": record.shortfalls(min_shadow_requests, max_disagreement),
        }

    def _records(self, name: str) -> list[DecisionRecord]:
        entries = self.client.xrevrange(names.decisions_stream(name), count=self.shadow_window)
        return decode_entries(entries)

    def _shadow_of(
        self, dep: Deployment, role: str, ref: ModelRef, records: list[DecisionRecord]
    ) -> ShadowRecord:
        if dep.roles.get(role) != ref:
            return shadow_record([], role, model=ref.name, version=ref.version)
        since = self.store.role_since_ms(dep.name, role)
        return shadow_record(records, role, model=ref.name, version=ref.version, since_ms=since)
