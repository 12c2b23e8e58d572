"""What ``/metrics`` reads from Redis at scrape time, as one snapshot: every deployment's stream
lengths and consumer groups, live workers, the counters that workers and log bins publish with
their heartbeats, the drift monitor's latest report and alerts, live accuracy. One pipelined
round trip per scrape, and a second only for the groups that have entries waiting (how long
the oldest has waited); ``metrics_state`` exposes the snapshot."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.deployments import ModelRef
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.connection import text as _text

STALE_STATS_S = 60.0
"""Counters of a process that has not published for this long are not exposed (it died)."""
FORGET_STATS_S = 600.0
"""... and after this long they are deleted, so that the hashes do not grow with every
restart of a worker named after its pid. A live process publishes its whole counters at each
heartbeat, so one that was only stalled loses nothing."""


@dataclass
class DeploymentState:
    input_length: int = 0
    decisions_length: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    """XINFO GROUPS of each input partition, each with its ``partition`` number added and
    ``waiting_s``: how long the oldest entry not yet delivered to the group has waited (0 when
    none waits). Redis 7 counts those entries (``lag``); 6.2 cannot, and this reads on both."""
    live_workers: dict[str, int] = field(default_factory=dict)
    live_members: list[str] = field(default_factory=list)
    """``role|consumer`` of every live worker."""
    roles: dict[str, ModelRef] = field(default_factory=dict)
    """What the deployment names for each role, as the reading gateway knows it (empty when
    not given): the workers' counters say what they serve."""
    worker_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``role|consumer`` -> the JSON counters it published."""
    drift: dict[str, Any] | None = None
    drift_alerts: set[str] = field(default_factory=set)
    """Kinds of the active drift alerts (``drift_store``: every source's)."""
    drift_raised: dict[str, int] = field(default_factory=dict)
    """Kind -> drift alerts raised."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Role -> input entries its group was moved past (``RDV_MAX_ROLE_LAG``)."""
    accuracy: dict[str, Any] | None = None
    """The live-accuracy report (``live_accuracy``), once a label came in."""


@dataclass
class ClusterState:
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    logbin_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def fresh_stats(
    raw: Mapping[bytes, bytes], now_s: float, forget: list[bytes]
) -> dict[str, dict[str, Any]]:
    """The counters published in the last ``STALE_STATS_S``; appends to ``forget`` the fields
    older than ``FORGET_STATS_S`` (or unreadable)."""
    out = {}
    for key, value in raw.items():
        try:
            doc = json.loads(value)
            age_s = now_s - float(doc.get("ts", 0))
        except (ValueError, TypeError, AttributeError):
            forget.append(key)
            continue
        if age_s <= STALE_STATS_S:
            out[_text(key)] = doc
        elif age_s > FORGET_STATS_S:
            forget.append(key)
    return out


def _raise_failure(replies: Sequence[Any]) -> None:
    """The first error reply that is not a stream yet to be made (``XINFO``'s "no such key"):
    Redis busy running a script, loading its data, a node lost. Taken as absent, each
    emptied the state, so a scrape said it had read Redis while every drift alert read 0 and
    counters fell to 0 and back (11 raises counted again by ``increase()``; a helper's
    probe); raised, the scrape serves the state it last read, as for a Redis that is down."""
    for reply in replies:
        if isinstance(reply, Exception) and "no such key" not in str(reply).lower():
            raise reply


async def read_state(
    client: AsyncClient,
    deployments: Mapping[str, Sequence[str]] | Sequence[str],
    heartbeat_timeout_s: float,
    roles: Mapping[str, Mapping[str, ModelRef]] | None = None,
) -> ClusterState:
    """``deployments``: names, or names -> their input streams (default: the first only);
    ``roles``: what each deployment names for its roles (``rdv_stale_workers`` compares the
    workers' counters with it)."""
    now = time.time()
    streams = (
        dict(deployments)
        if isinstance(deployments, Mapping)
        else {dep: [names.input_stream(dep)] for dep in deployments}
    )
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(names.LOGBIN_STATS)
    for dep, inputs in streams.items():
        pipe.xlen(names.decisions_stream(dep))
        pipe.eval(*clock.live_members_args(names.workers_key(dep), heartbeat_timeout_s))
        pipe.hgetall(names.stats_key(dep))
        pipe.get(names.drift_report_key(dep))
        pipe.hgetall(names.skipped_key(dep))
        pipe.hvals(names.drift_alerts_key(dep))
        pipe.hgetall(names.drift_event_counts_key(dep))
        pipe.get(names.accuracy_key(dep))
        for stream in inputs:
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
    replies = await pipe.execute(raise_on_error=False)
    _raise_failure(replies)
    state = ClusterState()
    forget: dict[str, list[bytes]] = {}
    waiting: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    if isinstance(replies[0], dict):
        state.logbin_stats = fresh_stats(replies[0], now, forget.setdefault(names.LOGBIN_STATS, []))
    at = 1
    for dep, inputs in streams.items():
        n = len(inputs)
        xlen_dec, live, stats, report, skipped, alerts, raised, accuracy = replies[at : at + 8]
        per_partition = replies[at + 8 : at + 8 + 2 * n]
        at += 8 + 2 * n
        ds = DeploymentState(roles=dict((roles or {}).get(dep, {})))
        infos = [x if isinstance(x, dict) else {} for x in per_partition[0::2]]  # none yet: error
        ds.input_length = sum(int(info.get("length", 0)) for info in infos)
        ds.decisions_length = xlen_dec if isinstance(xlen_dec, int) else 0
        for k, groups in enumerate(per_partition[1::2]):
            if isinstance(groups, list):  # no stream yet: an error
                for group in groups:
                    entry = {**group, "partition": k, "waiting_s": 0.0}
                    ds.groups.append(entry)
                    waiting.append((entry, inputs[k], infos[k]))
        if isinstance(live, list):
            ds.live_members = [_text(member) for member in live]
            for member in ds.live_members:
                role = member.split("|", 1)[0]
                ds.live_workers[role] = ds.live_workers.get(role, 0) + 1
        if isinstance(stats, dict):
            ds.worker_stats = fresh_stats(stats, now, forget.setdefault(names.stats_key(dep), []))
        if isinstance(report, bytes | str):
            try:
                ds.drift = json.loads(report)
            except ValueError:
                ds.drift = None
        if isinstance(accuracy, bytes | str):
            with contextlib.suppress(ValueError):
                ds.accuracy = json.loads(accuracy)
        if isinstance(skipped, dict):
            ds.skipped = {_text(role): int(n) for role, n in skipped.items()}
        for alert in alerts if isinstance(alerts, list) else []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ds.drift_alerts.add(str(json.loads(alert)["kind"]))
        if isinstance(raised, dict):
            ds.drift_raised = {_text(kind): int(n) for kind, n in raised.items()}
        state.deployments[dep] = ds
    await _waited(client, waiting, now)
    await _forget(client, forget)
    return state


async def _waited(
    client: AsyncClient, groups: list[tuple[dict[str, Any], str, dict[str, Any]]], now_s: float
) -> None:
    """Set each group's ``waiting_s`` from the first entry after its last delivered one: the
    stream's first entry when the group is behind all of it (read from XINFO STREAM), else one
    ``XRANGE`` of a single entry, pipelined for every group that has one waiting."""
    oldest: dict[int, bytes] = {}
    pipe = client.pipeline(transaction=False)
    asked = []
    for i, (group, stream, info) in enumerate(groups):
        delivered = bytes(group.get("last-delivered-id") or b"0-0")
        newest = info.get("last-generated-id")
        first = info.get("first-entry")
        at = clock.entry_order(delivered)
        if not newest or not first or at >= clock.entry_order(newest):
            continue  # nothing waits
        if at < clock.entry_order(first[0]):
            oldest[i] = bytes(first[0])
        else:
            pipe.xrange(stream, min=b"(" + delivered, count=1)
            asked.append(i)
    if asked:
        for i, found in zip(asked, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(found, list) and found:
                oldest[i] = bytes(found[0][0])
    for i, entry_id in oldest.items():
        groups[i][0]["waiting_s"] = max(0.0, now_s - clock.entry_order(entry_id)[0] / 1000)


async def _forget(client: AsyncClient, fields: dict[str, list[bytes]]) -> None:
    """Delete long-dead publishers' counters (a round trip only when there are some)."""
    pipe = client.pipeline(transaction=False)
    for key, keys in fields.items():
        if keys:
            pipe.hdel(key, *keys)
    if len(pipe):
        await pipe.execute(raise_on_error=False)


__all__ = [
    "FORGET_STATS_S",
    "STALE_STATS_S",
    "ClusterState",
    "DeploymentState",
    "fresh_stats",
    "read_state",
]
