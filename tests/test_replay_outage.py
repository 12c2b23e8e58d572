"""A replay rides out a Redis that goes away for a few seconds: a real Redis of this test's own,
stopped and started again on its port and data mid-replay, and a real cluster whose master of
the replay's slot is killed for good; the runner as the replay process runs it, on the demo
models and an archive of their real rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from models.archive import ArchiveReader, SegmentWriter
from models.registry import ModelRegistry
from models.replay import Runner
from models.replay_report import new_report
from models.replay_store import ReplayStore, new_replay_id
from models.train import DEMO_MODEL, REAL_VERSION, demo_data
from processes import wait_until
from rendezvous import names
from rendezvous.bus.connection import Client, connect
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import EmbeddedRedis

pytestmark = pytest.mark.integration

DEP = "ride-out"


def replay_through(client: Client, tmp_path: Path, demo_data_dir: Path, rows: int,
                   fault: Callable[[str], None], dep: str = DEP) -> dict[str, Any]:  # fmt: skip
    """Archive ``rows`` demo rows, start a replay of them (4 rows a batch, 0.2 s apart), call
    ``fault`` with the replay's report key after its first batch; the report it ended with."""
    writer = SegmentWriter(tmp_path / "archive")
    writer.append_batch(dep, [{"stream_id": f"{1000 + i}-0", "request_id": f"r-{i}",
                               "enqueued_ms": 1000.0 + i, "features": [row.tolist()]}
                              for i, row in enumerate(demo_data().x_test[:rows])])  # fmt: skip
    writer.close()
    store = ReplayStore(client)
    rid = new_replay_id()
    request: dict[str, Any] = {"from_ms": None, "to_ms": 2000.0 + rows, "last": None}
    now_ms = time.time() * 1000
    store.create(dep, new_report(rid, dep, DEMO_MODEL, REAL_VERSION, request, None, 4, now_ms),
                 {}, "test")  # fmt: skip
    client.delete(names.replay_lock_key(dep, rid))  # the runner's to take, as spawned
    runner = Runner(client, ModelRegistry(demo_data_dir / "models"),
                    ArchiveReader(tmp_path / "archive"), owner="runner", pause_s=0.2)  # fmt: skip
    ended: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: ended.update(runner.run(dep, rid)))
    thread.start()

    def done_so_far() -> int:
        seen = store.get(dep, rid)
        return int(seen["progress"]["done"]) if seen else 0

    wait_until(lambda: done_so_far() > 0, 30, "a first batch")
    fault(names.replay_key(dep, rid))
    thread.join(timeout=90)
    assert not thread.is_alive()
    stored = store.get(dep, rid)
    assert stored is not None and stored["state"] == ended["state"], (stored, ended)
    return ended


def test_a_replay_rides_out_a_redis_restart(tmp_path: Path, demo_data_dir: Path) -> None:
    """The replay process died of the ``ConnectionError`` of a 4 s Redis restart, and its
    report read ``running`` for 26 s, then ``interrupted``, for a person to resume (a
    helper's probe). It now waits for Redis and ends ``done``, every record scored once."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = connect(server.url)

    def restart(_key: str) -> None:
        server.stop()
        time.sleep(3.0)  # several batches' tries meet no Redis
        server.start()

    try:
        ended = replay_through(client, tmp_path, demo_data_dir, 40, restart)
        assert ended["state"] == "done", ended
        assert ended["records"] == ended["progress"]["done"] == 40, ended
    finally:
        client.close()
        server.stop()


def test_a_replay_follows_its_slot_to_the_replica_of_a_master_lost_for_good(
    tmp_path: Path, demo_data_dir: Path, redis_cluster: LocalCluster, rc: redis.RedisCluster
) -> None:
    """Its checkpoints (a cluster pipeline) kept trying the dead master for 60 s and the replay
    failed, though the replica was elected in 2 s (a helper's probe)."""
    port = redis_cluster.masters()[0]  # a failover test before may have left the first a replica
    client = connect(f"redis://127.0.0.1:{port}")  # the node it knows first is the one killed
    dep = next(
        d
        for d in (f"ride-{i}" for i in range(1000))
        if int(rc.get_node_from_key(names.deployment_key(d)).port) == port
    )
    killed: list[int] = []

    def kill_its_master(key: str) -> None:
        killed.append(int(rc.get_node_from_key(key).port))
        redis_cluster.kill(killed[0])

    try:
        ended = replay_through(client, tmp_path, demo_data_dir, 80, kill_its_master, dep)
        assert ended["state"] == "done", ended
        assert ended["records"] == ended["progress"]["done"] == 80, ended
    finally:
        client.close()
        if killed:
            redis_cluster.restart(killed[0])  # back as a replica, for the next tests


def test_a_replay_whose_redis_is_away_when_its_process_starts_waits_for_it(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    """A replay started just before its master was killed (a helper's probe on a real cluster):
    the process's first read of its report met the dead node, and the process died with a
    traceback, its report ``interrupted`` (0 records) for a person to resume, though the
    replica was elected seconds later. The first read now rides out the outage as the rest."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = connect(server.url)
    writer = SegmentWriter(tmp_path / "archive")
    writer.append_batch(DEP, [{"stream_id": f"{1000 + i}-0", "request_id": f"r-{i}",
                               "enqueued_ms": 1000.0 + i, "features": [row.tolist()]}
                              for i, row in enumerate(demo_data().x_test[:8])])  # fmt: skip
    writer.close()
    store = ReplayStore(client)
    rid = new_replay_id()
    request: dict[str, Any] = {"from_ms": None, "to_ms": 2008.0, "last": None}
    report = new_report(rid, DEP, DEMO_MODEL, REAL_VERSION, request, None, 4, time.time() * 1000)
    store.create(DEP, report, {}, "test")
    client.delete(names.replay_lock_key(DEP, rid))
    runner = Runner(client, ModelRegistry(demo_data_dir / "models"),
                    ArchiveReader(tmp_path / "archive"), owner="runner")  # fmt: skip
    server.stop()
    back = threading.Timer(2.0, server.start)
    back.start()
    try:
        ended = runner.run(DEP, rid)
        assert ended["state"] == "done", ended
        assert ended["records"] == 8, ended
    finally:
        back.join()
        client.close()
        server.stop()
