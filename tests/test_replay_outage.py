"""A replay rides out a Redis that goes away for a few seconds (a restart): a real Redis of
this test's own, stopped and started again on its port and data mid-replay, the runner as the
replay process runs it, on the demo models and an archive of their real rows."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from models.archive import ArchiveReader, SegmentWriter
from models.registry import ModelRegistry
from models.replay import Runner
from models.replay_report import new_report
from models.replay_store import ReplayStore, new_replay_id
from models.train import DEMO_MODEL, REAL_VERSION, demo_data
from processes import wait_until
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.bus.server import EmbeddedRedis

pytestmark = pytest.mark.integration

DEP = "ride-out"


def test_a_replay_rides_out_a_redis_restart(tmp_path: Path, demo_data_dir: Path) -> None:
    """The replay process died of the ``ConnectionError`` of a 4 s Redis restart, and its
    report read ``running`` for 26 s, then ``interrupted``, for a person to resume (a
    helper's probe). It now waits for Redis and ends ``done``, every record scored once."""
    rows = demo_data().x_test[:40]
    writer = SegmentWriter(tmp_path / "archive")
    writer.append_batch(DEP, [{"stream_id": f"{1000 + i}-0", "request_id": f"r-{i}",
                               "enqueued_ms": 1000.0 + i, "features": [row.tolist()]}
                              for i, row in enumerate(rows)])  # fmt: skip
    writer.close()
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = connect(server.url)
    try:
        store = ReplayStore(client)
        rid = new_replay_id()
        request: dict[str, Any] = {"from_ms": None, "to_ms": 2000.0, "last": None}
        report = new_report(
            rid, DEP, DEMO_MODEL, REAL_VERSION, request, None, 4, time.time() * 1000
        )
        store.create(DEP, report, {}, "test")
        client.delete(names.replay_lock_key(DEP, rid))  # the runner's to take, as spawned
        runner = Runner(client, ModelRegistry(demo_data_dir / "models"),
                        ArchiveReader(tmp_path / "archive"), owner="runner",
                        pause_s=0.2)  # fmt: skip
        ended: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: ended.update(runner.run(DEP, rid)))
        thread.start()

        def done_so_far() -> int:
            seen = store.get(DEP, rid)
            return int(seen["progress"]["done"]) if seen else 0

        wait_until(lambda: done_so_far() > 0, 30, "a first batch")
        server.stop()
        time.sleep(3.0)  # several batches' tries meet no Redis
        server.start()
        thread.join(timeout=90)
        assert not thread.is_alive()
        assert ended["state"] == "done", ended
        assert ended["records"] == ended["progress"]["done"] == len(rows), ended
        stored = store.get(DEP, rid)
        assert stored is not None and stored["state"] == "done"
    finally:
        client.close()
        server.stop()
