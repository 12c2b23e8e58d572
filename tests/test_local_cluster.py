"""The local Redis Cluster is a real one: three masters with a replica each on loopback, keys
routed by slot, and a killed master's replica takes over its slots and data within seconds."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from processes import alive
from rendezvous.bus.cluster_nodes import SLOTS
from rendezvous.bus.local_cluster import ClusterError, LocalCluster, cluster_ports


def _serving_masters(cluster: LocalCluster, seen_from: int) -> list[int]:
    return sorted(
        n["port"]
        for n in cluster.cluster_nodes(seen_from)
        if "master" in n["flags"] and n["slots"] and not n["flags"] & {"fail", "fail?"}
    )


def _sees_masters(cluster: LocalCluster, seen_from: int, ports: list[int]) -> bool:
    return _serving_masters(cluster, seen_from) == ports


def test_ports_and_their_bus_ports_are_free_and_below_55536() -> None:
    ports = cluster_ports(6)
    assert len(set(ports)) == 6
    assert all(1024 <= p < 55536 for p in ports)
    assert not {p + 10000 for p in ports} & set(ports)


def test_three_masters_with_one_replica_each(redis_cluster: LocalCluster) -> None:
    redis_cluster.wait_healthy()
    nodes = redis_cluster.cluster_nodes()
    masters = [n for n in nodes if "master" in n["flags"]]
    replicas = [n for n in nodes if "slave" in n["flags"]]
    assert len(masters) == 3 and len(replicas) == 3
    assert all(n["slots"] for n in masters)
    assert sorted(r["master"] for r in replicas) == sorted(m["id"] for m in masters)
    assert {n["port"] for n in nodes} == set(redis_cluster.nodes)
    assert all(n["bus_port"] == n["port"] + 10000 and n["port"] < 55536 for n in nodes)
    assert all(n["link"] == "connected" for n in nodes)
    for port in redis_cluster.nodes:
        client = redis_cluster.client(port)
        try:
            info = client.execute_command("CLUSTER INFO")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == SLOTS
            assert client.config_get("cluster-node-timeout") == {"cluster-node-timeout": "1000"}
            assert (
                client.config_get("cluster-require-full-coverage")["cluster-require-full-coverage"]
                == "no"
            )
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            role = client.info("replication")
            if role["role"] == "slave":
                assert role["master_link_status"] == "up"
        finally:
            client.close()
        folder = redis_cluster.node_dir(port)
        assert (folder / "nodes.conf").exists() and (folder / "appendonly.aof").exists()
        assert redis_cluster.pid(port) is not None


def test_hash_tags_route_keys_to_different_masters(rc: redis.RedisCluster) -> None:
    owner_of_slot = {}
    topology: dict[str, Any] = rc.cluster_nodes()
    for node in topology.values():
        if "master" in node["flags"]:
            for pair in node["slots"]:
                for slot in range(int(pair[0]), int(pair[-1]) + 1):
                    owner_of_slot[slot] = node["node_id"]
    assert len(owner_of_slot) == SLOTS
    owners = {}
    for i in range(20):
        key = f"rdv:{{deployment-{i}}}:input"
        slot = rc.execute_command("CLUSTER KEYSLOT", key)
        assert slot == rc.keyslot(key)
        # Same tag, same slot: a deployment's keys stay together.
        assert rc.keyslot(f"rdv:{{deployment-{i}}}:output") == slot
        node = rc.get_node_from_key(key)
        assert node is not None
        owners[i] = node.port
        master_ports = {
            n["node_id"]: int(address.rsplit(":", 1)[1])
            for address, n in rc.cluster_nodes().items()
        }
        assert master_ports[owner_of_slot[slot]] == node.port
    assert len(set(owners.values())) == 3, owners


def test_a_write_is_read_back_and_another_master_answers_moved(
    rc: redis.RedisCluster, redis_cluster: LocalCluster
) -> None:
    key = "rdv:{demo}:probe"
    rc.set(key, b"here")
    assert rc.get(key) == b"here"
    owner = rc.get_node_from_key(key)
    assert owner is not None
    direct = redis_cluster.client(owner.port)
    try:
        assert direct.get(key) == "here"
    finally:
        direct.close()
    other = next(p for p in redis_cluster.masters() if p != owner.port)
    wrong = redis_cluster.client(other)
    try:
        with pytest.raises(redis.exceptions.MovedError) as moved:
            wrong.get(key)
        assert (moved.value.slot_id, moved.value.port) == (rc.keyslot(key), owner.port)
    finally:
        wrong.close()


def test_a_killed_master_fails_over_to_its_replica_and_rejoins_as_a_replica(
    rc: redis.RedisCluster, redis_cluster: LocalCluster
) -> None:
    key = "rdv:{failover}:probe"
    owner = rc.get_node_from_key(key)
    assert owner is not None
    dead = owner.port
    by_port = {n["port"]: n for n in redis_cluster.cluster_nodes()}
    (heir,) = [p for p, n in by_port.items() if n["master"] == by_port[dead]["id"]]
    new_masters = sorted({*redis_cluster.masters(), heir} - {dead})
    master = redis_cluster.client(dead)
    try:
        master.set(key, "before")
        assert master.wait(1, 2000) == 1  # reached the replica before the kill
    finally:
        master.close()

    try:
        redis_cluster.kill(dead)
        assert redis_cluster.pid(dead) is None
        t0 = time.monotonic()

        def promoted() -> bool:
            client = redis_cluster.client(heir)
            try:
                return bool(
                    client.info("replication")["role"] == "master"
                    and client.execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                    and client.get(key) == "before"
                )
            finally:
                client.close()

        redis_cluster.wait_for(promoted, timeout_s=10.0)
        took = time.monotonic() - t0
        assert took < 5.0, f"failover took {took:.1f}s"
        # Every survivor learns it by gossip, a moment later.
        for port in redis_cluster.nodes:
            if port != dead:
                redis_cluster.wait_for(partial(_sees_masters, redis_cluster, port, new_masters))
        # The cluster client finds the new owner (after its own retries and a topology refresh).
        redis_cluster.wait_for(lambda: rc.get(key) == b"before", timeout_s=10.0)
        rc.set(key, b"after")

        redis_cluster.restart(dead)
        redis_cluster.wait_healthy(20.0)
        assert dead in redis_cluster.replicas()
        by_port = {n["port"]: n for n in redis_cluster.cluster_nodes()}
        assert by_port[dead]["master"] == by_port[heir]["id"]
        back = redis_cluster.client(dead)
        try:
            back.execute_command("READONLY")
            redis_cluster.wait_for(lambda: back.get(key) == "after", timeout_s=5.0)
        finally:
            back.close()
    finally:
        # Leave the session's cluster whole for the tests after this one.
        if redis_cluster.pid(dead) is None:
            redis_cluster.restart(dead)
        redis_cluster.wait_healthy(30.0)
    assert len(redis_cluster.masters()) == 3 and len(redis_cluster.replicas()) == 3


@pytest.mark.integration
def test_a_start_that_times_out_says_why_and_leaves_no_process(tmp_path: Path) -> None:
    # Masters hold cluster_state:fail for 2 s after they start (Redis's rejoin delay), so a
    # 1.5 s budget cannot be met: either redis-cli or the wait for health runs out of it.
    cluster = LocalCluster(tmp_path)
    pids: list[int] = []
    real_create = cluster._create

    def create_and_note_pids(deadline: float) -> None:
        pids.extend(p for p in map(cluster.pid, cluster.nodes) if p is not None)
        real_create(deadline)

    cluster._create = create_and_note_pids  # type: ignore[method-assign]
    with pytest.raises(ClusterError, match="redis-cli") as caught:
        cluster.start(timeout_s=1.5)
    assert "127.0.0.1:" in str(caught.value)
    assert len(pids) == 6
    assert not [pid for pid in pids if alive(pid)]
    assert all(cluster.pid(p) is None for p in cluster.nodes)
