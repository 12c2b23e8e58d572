"""Deployment state as values: which model version holds which role, the schedule, the feature
spec, the input partitions; and the changes (promote, challengers, schedule, partitions) as pure
functions from one state to the next. Stored and changed atomically by
``models.deployment_store``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rendezvous import names
from rendezvous.input_types import InputRule, input_rule
from rendezvous.schedule import Schedule
from rendezvous.spec import FeatureSpec, unknown_fields

log = logging.getLogger(__name__)

_STATE_FIELDS = frozenset({"name", "revision", "updated_ms", "roles", "schedule", "feature_spec",
                           "partitions", "past_partitions", "deleted_ms",
                           "input_types", "left_partitions"})  # fmt: skip
LEFT_PARTITIONS_KEPT = 16
"""Partition counts ``left_partitions`` remembers (the latest left)."""


class DeploymentNotFound(LookupError):
    pass


class DeploymentConflict(ValueError):
    """A change that does not fit the deployment's current state."""


class DeploymentUnreadable(Exception):
    """A stored state this version cannot read: a newer version wrote it (a rolling upgrade),
    or it is damaged. Not a ``ValueError``: nothing a caller sent is at fault, and the admin
    API answers it 409, not 422 (it was a 500)."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ModelRef:
        return cls(str(doc["name"]), int(doc["version"]))


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    roles: dict[str, ModelRef]
    feature_spec: FeatureSpec
    schedule: Schedule = field(default_factory=Schedule)
    revision: int = 1
    updated_ms: int = 0
    partitions: int = 1
    """Input streams a request is spread over (by request id)."""
    past_partitions: tuple[int, ...] = ()
    """Partition counts this deployment had before: their streams are still read, so that
    what was published to them before a change is drained (they take nothing new)."""
    deleted_ms: int = 0
    """When it was deleted (0: it was not). A deleted deployment takes no new request, but its
    readers go on until what it accepted is drained; then its state and streams are purged
    (``models.deployment_purge``)."""
    input_types: tuple[str, ...] = ()
    """The input types of its roles' models when any is not float32 (``rendezvous.input_types``:
    the gateway validates and carries the rows so that every one takes them unchanged); set by
    the admin API at every change of roles. Empty: float32 alone, as every state before."""
    left_partitions: Mapping[int, int] = field(default_factory=dict)
    """Partition counts requests were published under before, each with when it stopped
    (epoch ms). A caller's request id is taken under its partition's hash tag, which a change
    of count moves: the id stays taken under the old one for ``RDV_REQUEST_ID_TTL_S``, so
    the gateway looks there too (``earlier_id_keys``); 44 of 60 ids were taken again after a
    change from 1 partition to 3 (a helper's rolling probe). Unlike ``past_partitions`` it
    outlives the old streams' drain."""
    more: Mapping[str, Any] = field(default_factory=dict)
    """Fields a newer version wrote, kept as they came (``rendezvous.spec.unknown_fields``)."""

    def __post_init__(self) -> None:
        names.check_name(self.name, "deployment")
        if not 1 <= self.partitions <= names.MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1 to {names.MAX_PARTITIONS}")
        if names.REAL not in self.roles:
            raise ValueError("a deployment needs a real model")
        for role in self.roles:
            names.check_role(role)
        for role in self.schedule.split_roles:
            if role not in self.roles:
                raise ValueError(f"the split names {role}, which is not a role of {self.name}")
        input_rule(self.input_types)  # a type this version does not know: not readable here

    @property
    def input_rule(self) -> InputRule | None:
        """How the gateway validates and carries its rows; None (float32 alone): as ever."""
        return input_rule(self.input_types) if self.input_types else None

    @property
    def role_names(self) -> list[str]:
        """Real first, then the rest in a stable order."""
        return [names.REAL, *sorted(r for r in self.roles if r != names.REAL)]

    @property
    def challengers(self) -> list[str]:
        """Roles beside real and canary: they score every request and answer none, unless
        the schedule's split gives them a share."""
        return sorted(r for r in self.roles if r not in (names.REAL, names.CANARY))

    @property
    def input_streams(self) -> list[str]:
        """Every input stream the readers read: first the ``partitions`` published to, then
        those of earlier counts."""
        out = names.input_streams(self.name, self.partitions)
        for count in self.past_partitions:
            out += [s for s in names.input_streams(self.name, count) if s not in out]
        return out

    @property
    def published_streams(self) -> list[str]:
        """The input streams requests go to now (the first ``partitions`` read)."""
        return names.input_streams(self.name, self.partitions)

    def input_stream_for(self, request_id: str) -> str:
        """The partition a request is published to."""
        partition = names.partition_for(request_id, self.partitions)
        return names.input_stream(self.name, partition, self.partitions)

    def earlier_id_keys(self, request_id: str, since_ms: float) -> list[str]:
        """The keys a caller's ``request_id`` may still be taken under from partition counts
        left at or after ``since_ms``, other than the one a request takes now."""
        now = names.request_id_key(self.input_stream_for(request_id), request_id)
        counts = [n for n, left_ms in self.left_partitions.items() if left_ms >= since_ms]
        keys = names.request_id_keys(self.name, request_id, counts) if counts else []
        return [key for key in dict.fromkeys(keys) if key != now]

    def groups(self) -> list[str]:
        return [names.LOGBIN_GROUP, *(names.model_group(r) for r in self.role_names)]

    def version_name(self, ref: ModelRef) -> str:
        """A model version as a protocol names it: the number for a version of the model named
        as the deployment while a role holds one (else of real's model), ``model:number`` for
        another model's (a challenger uploaded under another name). By number alone, two
        models' version 1 read as one version, and a pinned infer went to whichever role sorted
        first (a helper's probe). Named by the deployment's own model first, the names hold
        across the promotion of such a challenger, which by real's alone turned "1" from the
        canary into the new real."""
        own = self.name if any(r.name == self.name for r in self.roles.values()) else None
        return str(ref.version) if ref.name == (own or self.roles[names.REAL].name) else str(ref)

    @property
    def versions(self) -> list[str]:
        """The model versions that hold a role (as a protocol names them), real's first."""
        return list(dict.fromkeys(self.version_name(self.roles[r]) for r in self.role_names))

    def roles_holding(self, version: str) -> list[str]:
        """The roles whose model is at ``version`` (as a protocol names it), real first."""
        return [r for r in self.role_names if self.version_name(self.roles[r]) == version]

    def role_of(self, ref: ModelRef) -> str | None:
        return next((r for r in self.role_names if self.roles[r] == ref), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.more,
            "name": self.name,
            "revision": self.revision,
            "updated_ms": self.updated_ms,
            "roles": {r: m.to_dict() for r, m in self.roles.items()},
            "schedule": self.schedule.to_dict(),
            "feature_spec": self.feature_spec.to_dict(),
            "partitions": self.partitions,
            "past_partitions": list(self.past_partitions),
            **({"deleted_ms": self.deleted_ms} if self.deleted_ms else {}),
            **({"input_types": list(self.input_types)} if self.input_types else {}),
            **(
                {"left_partitions": {str(n): ms for n, ms in self.left_partitions.items()}}
                if self.left_partitions
                else {}
            ),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str | bytes) -> Deployment:
        """Raises ``DeploymentUnreadable`` for a state this version cannot read."""
        try:
            doc: Mapping[str, Any] = json.loads(raw)
            return cls(
                name=doc["name"],
                revision=int(doc["revision"]),
                updated_ms=int(doc.get("updated_ms", 0)),
                roles={r: ModelRef.from_dict(m) for r, m in doc["roles"].items()},
                schedule=Schedule.from_dict(doc["schedule"]),
                feature_spec=FeatureSpec.from_dict(doc["feature_spec"]),
                partitions=int(doc.get("partitions", 1)),
                past_partitions=tuple(int(n) for n in doc.get("past_partitions", ())),
                deleted_ms=int(doc.get("deleted_ms", 0)),
                input_types=tuple(str(t) for t in doc.get("input_types", ())),
                left_partitions={
                    int(n): int(ms) for n, ms in doc.get("left_partitions", {}).items()
                },
                more=unknown_fields(doc, _STATE_FIELDS),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            named = _name_in(raw)
            why = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DeploymentUnreadable(
                f"the state of deployment {named} cannot be read by this version ({why}): a "
                "newer version wrote it (change it through a gateway of that version), or it "
                "is damaged"
            ) from exc


def _name_in(raw: str | bytes) -> str:
    """The deployment's name as an unreadable state gives it, shown safely (or "?")."""
    try:
        name = json.loads(raw).get("name")
    except (ValueError, AttributeError):
        return "?"
    return repr(name)[:200] if isinstance(name, str) else "?"


# -- changes: pure functions from one state to the next ----------------------------------------


def promoted(dep: Deployment, ref: ModelRef, *, pin_canary: bool = False) -> Deployment:
    """``ref`` becomes real and the old real the canary (the old canary retires); with
    ``pin_canary`` the canary stays and the old real retires. A challenger that held ``ref``
    gives its role up."""
    old_real = dep.roles[names.REAL]
    if ref == old_real:
        raise DeploymentConflict(f"{ref} is already the real model of {dep.name}")
    if pin_canary and dep.roles.get(names.CANARY) == ref:
        raise DeploymentConflict(f"{ref} is the canary: it cannot be pinned and promoted")
    roles = {r: m for r, m in dep.roles.items() if m != ref}
    roles[names.REAL] = ref
    if not pin_canary:
        roles[names.CANARY] = old_real
    schedule = dep.schedule
    for role in dep.roles:
        if role not in roles:
            schedule = schedule.without_role(role)
    return dataclasses.replace(dep, roles=roles, schedule=schedule)


def with_challenger(
    dep: Deployment, role: str, ref: ModelRef, split: float | None = None
) -> Deployment:
    names.check_role(role)
    if role in (names.REAL, names.CANARY):
        raise DeploymentConflict(f"{role} is not a challenger role; use promote")
    if role in dep.roles:
        raise DeploymentConflict(f"{dep.name} already has a role {role} ({dep.roles[role]})")
    holder = dep.role_of(ref)
    if holder is not None:
        raise DeploymentConflict(f"{ref} already holds the role {holder} in {dep.name}")
    schedule = dep.schedule
    if split:
        schedule = dataclasses.replace(schedule, splits=(*schedule.splits, (role, split)))
    return dataclasses.replace(dep, roles={**dep.roles, role: ref}, schedule=schedule)


def without_challenger(dep: Deployment, role: str) -> Deployment:
    if role in (names.REAL, names.CANARY):
        raise DeploymentConflict(f"{role} is not a challenger; use promote or rollback")
    if role not in dep.roles:
        raise DeploymentConflict(f"{dep.name} has no challenger {role}")
    roles = {r: m for r, m in dep.roles.items() if r != role}
    return dataclasses.replace(dep, roles=roles, schedule=dep.schedule.without_role(role))


def with_schedule(dep: Deployment, changes: Mapping[str, Any]) -> Deployment:
    return dataclasses.replace(dep, schedule=dep.schedule.updated(changes))


def deleted(dep: Deployment) -> Deployment:
    """Deleted now: it takes no new request (see ``Deployment.deleted_ms``)."""
    return dataclasses.replace(dep, deleted_ms=int(time.time() * 1000))


def without_past_partitions(dep: Deployment, count: int) -> Deployment:
    """``count``'s streams drained and deleted: read no more (``models.deployment_purge``).
    A conflict if the count is no longer a past one (set again meanwhile)."""
    if count not in dep.past_partitions:
        raise DeploymentConflict(f"{dep.name} has no earlier partition count {count} now")
    past = tuple(n for n in dep.past_partitions if n != count)
    return dataclasses.replace(dep, past_partitions=past)


def with_partitions(dep: Deployment, partitions: int) -> Deployment:
    """Requests spread over ``partitions`` streams from now on; the readers keep reading every
    stream there ever was, so nothing published to a partition a shrink removed is dropped."""
    if partitions == dep.partitions:
        raise DeploymentConflict(f"{dep.name} already has {partitions} partitions")
    past = tuple(sorted({*dep.past_partitions, dep.partitions} - {1, partitions}))
    left = {**dep.left_partitions, dep.partitions: int(time.time() * 1000)}
    kept = dict(sorted(left.items(), key=lambda item: item[1])[-LEFT_PARTITIONS_KEPT:])
    return dataclasses.replace(dep, partitions=partitions, past_partitions=past,
                               left_partitions=kept)  # fmt: skip


class StateReader:
    """Deployment states parsed for a process that follows every deployment: one it cannot
    read (a state a newer version wrote, or a damaged one) is left out and said once per
    content, not raised. Raised, one such state stopped a log bin archiving every deployment,
    its workers restarting in a loop (found by a helper's upgrade probe)."""

    def __init__(self, who: str):
        self.who = who
        self._unreadable: dict[str, bytes] = {}

    def parse(self, name: str, raw: bytes | str) -> Deployment | None:
        try:
            state = Deployment.from_json(raw)
        except DeploymentUnreadable as exc:
            seen = raw if isinstance(raw, bytes) else raw.encode()
            if self._unreadable.get(name) != seen:
                self._unreadable[name] = seen
                log.error("%s: deployment %s has a state it cannot read, left as it was: %s",
                          self.who, name, exc)  # fmt: skip
            return None
        self._unreadable.pop(name, None)
        return state
