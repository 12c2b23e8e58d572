"""Which live workers serve a model other than the one their deployment names for their role.

A worker that cannot load a promoted version keeps serving the one it has (``worker.py``: a
role is never left without a model), so callers are answered by the old version as ``real``
while the deployment names the new one. Its heartbeat's counters carry the version it serves
(``RoleModel.stats_json``); read beside the live members and the deployment's roles, they say
which workers lag. Right after a change every worker lags until it has loaded the new model
(a second or two): an alert waits longer than that."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from models.deployments import ModelRef


def serves(stats: Mapping[str, Any] | None) -> str | None:
    """``name:version`` a worker said it serves in its counters (None: nothing, or unknown)."""
    if not stats or stats.get("model") is None or stats.get("version") is None:
        return None
    return f"{stats['model']}:{stats['version']}"


def stale_workers(
    roles: Mapping[str, ModelRef],
    live: Iterable[str],
    stats: Mapping[str, Mapping[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Role -> its live workers (``role|consumer`` members of ``live``) whose counters name
    another model than ``roles`` does, each as ``{"worker": consumer, "serves": "name:version"
    or None}``. A live worker without fresh counters is not judged (it has not published yet),
    nor one of a role the deployment no longer has (it is being retired)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for member in sorted(live):
        role, _, consumer = member.partition("|")
        named = roles.get(role)
        if named is None or member not in stats:
            continue
        served = serves(stats[member])
        if served != str(named):
            out.setdefault(role, []).append({"worker": consumer, "serves": served})
    return out


__all__ = ["serves", "stale_workers"]
