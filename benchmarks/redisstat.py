"""What Redis did during a load: commands (``INFO commandstats``), bytes (``INFO stats``) and
the CPU of its main thread (``INFO cpu``) on every master, read before and after the load, as
deltas per answered request.

Every command counts, the system's background work included (heartbeats, deployment cache
refreshes, retention, the drift feed, metrics scrapes): at a steady load that is part of what a
request costs. A command run inside ``EVAL`` or ``MULTI`` counts as a call of its own, beside
the ``EVAL``/``EXEC`` (that is how Redis counts them). The ``INFO`` calls of the samples
themselves are taken out of the counts; their replies (a few KB per node per load) stay in the
output bytes.

On a cluster, a master's output bytes include what it streams to its replica; the replicas'
input bytes (``repl_bytes``) are that stream, so client traffic is ``in + out - repl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

OWN_INFO_CALLS = 3
"""``INFO`` calls one sample makes on a node (commandstats, stats, cpu); the next sample's
counts include them."""


@dataclass(frozen=True)
class Node:
    host: str
    port: int
    role: str
    """``master`` (counted) or ``replica`` (only its input bytes: the replication stream)."""

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class NodeSample:
    calls: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    main_cpu_s: float
    """User + system CPU of the main thread (the one that runs the commands: what saturates
    a shard), or of the whole process where Redis does not say (before 6.2)."""


def _sample_node(node: Node, timeout_s: float) -> NodeSample:
    client = redis.Redis(
        host=node.host, port=node.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        commands = client.info("commandstats")
        stats = client.info("stats")
        cpu = client.info("cpu")
    finally:
        client.close()
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for key, value in commands.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            name = key.removeprefix("cmdstat_")
            calls[name] = int(value.get("calls", 0))
            usec[name] = int(value.get("usec", 0))
    main = ("used_cpu_user_main_thread", "used_cpu_sys_main_thread")
    keys = main if all(k in cpu for k in main) else ("used_cpu_user", "used_cpu_sys")
    return NodeSample(
        calls,
        usec,
        int(stats["total_net_input_bytes"]),
        int(stats["total_net_output_bytes"]),
        sum(float(cpu[k]) for k in keys),
    )


def sample(nodes: list[Node], timeout_s: float = 2.0) -> dict[Node, NodeSample]:
    return {node: _sample_node(node, timeout_s) for node in nodes}


def delta(a: dict[Node, NodeSample], b: dict[Node, NodeSample], answered: int) -> dict[str, Any]:
    """Commands and bytes between two samples, summed over the masters, and per answered
    request; per command and per master beside the totals."""
    by_command: dict[str, int] = {}
    usec_by_command: dict[str, int] = {}
    by_node: dict[str, int] = {}
    usec_by_node: dict[str, int] = {}
    cpu_by_node: dict[str, float] = {}
    bytes_by_node: dict[str, tuple[int, int]] = {}
    net_in = net_out = repl = 0
    masters = 0
    for node, after in b.items():
        before = a[node]
        if node.role != "master":
            repl += after.net_in - before.net_in
            continue
        masters += 1
        total = node_usec = 0
        for name, calls in after.calls.items():
            n = calls - before.calls.get(name, 0)
            if name == "info":
                n -= OWN_INFO_CALLS
            if n <= 0:
                continue
            by_command[name] = by_command.get(name, 0) + n
            usec = after.usec.get(name, 0) - before.usec.get(name, 0)
            usec_by_command[name] = usec_by_command.get(name, 0) + usec
            total += n
            node_usec += usec
        by_node[node.name] = total
        usec_by_node[node.name] = node_usec
        cpu_by_node[node.name] = after.main_cpu_s - before.main_cpu_s
        bytes_by_node[node.name] = (after.net_in - before.net_in, after.net_out - before.net_out)
        net_in += bytes_by_node[node.name][0]
        net_out += bytes_by_node[node.name][1]
    commands = sum(by_command.values())
    client_bytes = net_in + net_out - repl

    def per(value: float) -> float | None:
        return round(value / answered, 3) if answered else None

    return {
        "masters": masters,
        "answered": answered,
        "commands": commands,
        "commands_per_request": per(commands),
        "commands_per_request_by_command": {
            k: per(v) for k, v in sorted(by_command.items(), key=lambda kv: -kv[1])
        },
        "commands_by_master": by_node,
        "redis_usec_per_request": per(sum(usec_by_command.values())),
        "redis_usec_per_request_by_command": {
            k: per(v) for k, v in sorted(usec_by_command.items(), key=lambda kv: -kv[1])
        },
        "redis_usec_per_request_by_master": {k: per(v) for k, v in usec_by_node.items()},
        "main_thread_cpu_s_by_master": {k: round(v, 3) for k, v in cpu_by_node.items()},
        "main_thread_cpu_us_per_request": per(sum(cpu_by_node.values()) * 1e6),
        "busiest_master_cpu_us_per_request": per(max(cpu_by_node.values(), default=0.0) * 1e6),
        "net_input_bytes": net_in,
        "net_output_bytes": net_out,
        "repl_bytes": repl,
        "bytes_per_request": per(client_bytes),
        "input_bytes_per_request": per(net_in),
        "output_bytes_per_request": per(net_out - repl),
        "repl_bytes_per_request": per(repl),
        "bytes_per_request_by_master": {
            k: {"in": per(i), "out": per(o)} for k, (i, o) in bytes_by_node.items()
        },
    }
