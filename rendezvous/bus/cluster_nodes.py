"""What one node of a Redis Cluster says of it: ``CLUSTER NODES`` and ``CLUSTER INFO`` read, and
why the cluster is not whole as that node sees it. The local test cluster
(``rendezvous.bus.local_cluster``) waits on these after a start, a kill or a restart."""

from __future__ import annotations

import re
from typing import Any

import redis

SLOTS = 16384

_BAD_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


def parse_cluster_nodes(text: str) -> list[dict[str, Any]]:
    """One dict per node: id, port, bus_port, flags (a set, without "myself"), myself, master
    (its id, or None), link, slots (the ranges)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address, _, bus = parts[1].partition("@")
        nodes.append(
            {
                "id": parts[0],
                "port": int(address.rsplit(":", 1)[1]) if ":" in address else 0,
                "bus_port": int(bus.split(",")[0]) if bus else 0,
                "flags": set(parts[2].split(",")) - {"myself"},
                "myself": "myself" in parts[2].split(","),
                "master": None if parts[3] == "-" else parts[3],
                "link": parts[7],
                "slots": parts[8:],
            }
        )
    return nodes


def is_serving_master(node: dict[str, Any]) -> bool:
    return "master" in node["flags"] and not node["flags"] & {"fail", "fail?"} and node["slots"]


def node_problems(client: redis.Redis, port: int, masters: int, replicas: int) -> list[str]:
    """Why the cluster is not whole as the node at ``port`` sees it, which should see
    ``masters`` serving masters and ``replicas`` replicas (empty when it is whole)."""
    try:
        info = _fields(cluster_text(client, "INFO"))
        nodes = parse_cluster_nodes(cluster_text(client, "NODES"))
        repl = client.info("replication")
    except (redis.RedisError, OSError) as exc:
        return [f"{port}: {type(exc).__name__}: {exc}"]
    found = []
    if info.get("cluster_state") != "ok":
        found.append(f"{port}: cluster_state:{info.get('cluster_state')}")
    if info.get("cluster_slots_assigned") != str(SLOTS):
        found.append(f"{port}: {info.get('cluster_slots_assigned')} slots assigned")
    if info.get("cluster_slots_ok") != str(SLOTS):
        found.append(f"{port}: {info.get('cluster_slots_ok')} slots ok")
    serving = {n["id"] for n in nodes if is_serving_master(n)}
    slaves = [n for n in nodes if "slave" in n["flags"]]
    if len(serving) != masters or len(slaves) != replicas:
        found.append(f"{port}: sees {len(serving)} masters, {len(slaves)} replicas")
    for n in nodes:
        if n["link"] != "connected" or n["flags"] & _BAD_FLAGS:
            found.append(f"{port}: sees {n['port']} {','.join(sorted(n['flags']))}")
    for s in slaves:
        if s["master"] not in serving:
            found.append(f"{port}: sees replica {s['port']} of no serving master")
    if repl.get("role") == "slave" and (
        repl.get("master_link_status") != "up" or repl.get("master_sync_in_progress")
    ):
        found.append(f"{port}: replica link {repl.get('master_link_status')}")
    return found


def cluster_text(client: redis.Redis, subcommand: str) -> str:
    """``CLUSTER <subcommand>``'s text as the server sent it (split in two words, the command
    escapes redis-py's parsers for "CLUSTER NODES" and "CLUSTER INFO")."""
    return plain_text(client.execute_command("CLUSTER", subcommand))


def _fields(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain_text(data: bytes | str | None) -> str:
    """Text, without the colour codes ``redis-cli --cluster`` prints even into a pipe."""
    if data is None:
        return ""
    return _ANSI.sub("", data if isinstance(data, str) else data.decode(errors="replace"))
