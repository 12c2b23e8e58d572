"""Deployment state: which model version holds which role, the schedule, the feature spec.

The state is one JSON document per deployment in Redis, so every gateway and worker process
sees the same thing; ``revision`` grows with every change so followers notice one cheaply.
Creating a deployment also creates the consumer groups of its input stream, at the start of
the stream, so every bin receives every request from the first one on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from models.registry import ModelRegistry
from models.spec import FeatureSpec
from rendezvous import names
from rendezvous.schedule import Schedule


class DeploymentNotFound(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    roles: dict[str, ModelRef]
    feature_spec: FeatureSpec
    schedule: Schedule = field(default_factory=Schedule)
    revision: int = 1
    updated_ms: int = 0

    def __post_init__(self) -> None:
        names.check_name(self.name, "deployment")
        if names.REAL not in self.roles:
            raise ValueError("a deployment needs a real model")
        for role in self.roles:
            names.check_role(role)

    @property
    def role_names(self) -> list[str]:
        """Real first, then the rest in a stable order."""
        return [names.REAL, *sorted(r for r in self.roles if r != names.REAL)]

    def groups(self) -> list[str]:
        return [names.LOGBIN_GROUP, *(names.model_group(r) for r in self.role_names)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "revision": self.revision,
                "updated_ms": self.updated_ms,
                "roles": {r: {"name": m.name, "version": m.version} for r, m in self.roles.items()},
                "schedule": self.schedule.to_dict(),
                "feature_spec": self.feature_spec.to_dict(),
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Deployment:
        doc: Mapping[str, Any] = json.loads(raw)
        return cls(
            name=doc["name"],
            revision=int(doc["revision"]),
            updated_ms=int(doc.get("updated_ms", 0)),
            roles={r: ModelRef(m["name"], int(m["version"])) for r, m in doc["roles"].items()},
            schedule=Schedule.from_dict(doc["schedule"]),
            feature_spec=FeatureSpec.from_dict(doc["feature_spec"]),
        )


def ensure_groups(client: redis.Redis, deployment: Deployment) -> None:
    """Create the input stream's consumer groups that are missing, positioned at its start."""
    stream = names.input_stream(deployment.name)
    pipe = client.pipeline(transaction=False)
    for group in deployment.groups():
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
            raise result


class DeploymentStore:
    """Synchronous access for the CLI, workers and start-up."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def get(self, name: str) -> Deployment:
        raw = self.client.get(names.deployment_key(name))
        if raw is None:
            raise DeploymentNotFound(f"deployment {name!r} does not exist")
        return Deployment.from_json(raw)

    def list(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(names.DEPLOYMENTS_SET))

    def create(self, deployment: Deployment) -> bool:
        """Create unless it exists; False when another process was first."""
        created = bool(
            self.client.set(names.deployment_key(deployment.name), deployment.to_json(), nx=True)
        )
        current = self.get(deployment.name)
        ensure_groups(self.client, current)
        self.client.sadd(names.DEPLOYMENTS_SET, deployment.name)
        return created


def demo_deployment(registry: ModelRegistry, schedule: Schedule) -> Deployment:
    from models.train import CANARY_VERSION, DEMO_DEPLOYMENT, DEMO_MODEL, REAL_VERSION

    real = registry.meta(DEMO_MODEL, REAL_VERSION)
    return Deployment(
        name=DEMO_DEPLOYMENT,
        roles={
            names.REAL: ModelRef(DEMO_MODEL, REAL_VERSION),
            names.CANARY: ModelRef(DEMO_MODEL, CANARY_VERSION),
        },
        feature_spec=real.feature_spec,
        schedule=schedule,
        updated_ms=int(time.time() * 1000),
    )
