"""A deployment's history: one entry per change (and per refused promotion), newest last.

An entry says who, when, what and why, and holds the roles and schedule after the change,
which is what a rollback restores (``state_at``). Built here and appended by
``DeploymentStore`` in the same transaction as the change itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from models.deployments import Deployment, DeploymentConflict


def history_entry(
    before: Deployment | None,
    after: Deployment,
    action: str,
    actor: str,
    reason: str,
    detail: Mapping[str, Any],
    applied: bool = True,
) -> dict[str, Any]:
    """``applied`` False: a note of something that changed nothing (a refused promotion)."""
    return {
        "revision": after.revision,
        "ts_ms": int(time.time() * 1000),
        "actor": actor,
        "action": action,
        "reason": reason,
        "applied": applied,
        "changes": _role_changes(before, after) if applied else {},
        "detail": dict(detail),
        "roles": {r: m.to_dict() for r, m in after.roles.items()},
        "schedule": after.schedule.to_dict(),
    }


def _role_changes(before: Deployment | None, after: Deployment) -> dict[str, list[str | None]]:
    old = before.roles if before else {}
    out: dict[str, list[str | None]] = {}
    for role in sorted(set(old) | set(after.roles)):
        a, b = old.get(role), after.roles.get(role)
        if a != b:
            out[role] = [str(a) if a else None, str(b) if b else None]
    return out


def state_at(history: Sequence[Mapping[str, Any]], name: str, revision: int) -> dict[str, Any]:
    """Roles and schedule as they were at ``revision`` (from its history entry)."""
    for entry in reversed(history):
        if entry.get("applied", True) and entry["revision"] == revision:
            return {"roles": entry["roles"], "schedule": entry["schedule"]}
    raise DeploymentConflict(f"{name} has no revision {revision} in its history")


def role_since_ms(history: Sequence[Mapping[str, Any]], role: str) -> float | None:
    """When ``role`` got the model version it holds now (None: since before history)."""
    since = None
    holder = None
    for entry in reversed(history):
        if entry["action"] == "delete":
            break  # an earlier life of the name
        if not entry.get("applied", True):
            continue
        ref = entry["roles"].get(role)
        if holder is None:
            holder = ref
        if ref is None or ref != holder:
            break
        since = float(entry["ts_ms"])
    return since
