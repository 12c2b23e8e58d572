"""Deleting a deployment: no new request from then on, everything it accepted answered, scored
and archived, then its state and streams purged by the log bin, on a single Redis and on the
cluster; an append that comes too late fails instead of landing where no reader looks."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.dataplane.job_store import JobStore
from models.archive import ArchiveReader, SegmentWriter
from models.demo import demo_deployment
from models.deployment_purge import Purger, serving_keys
from models.deployment_store import DeploymentStore, ensure_groups
from models.deployments import DeploymentConflict, DeploymentNotFound, with_partitions
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import Load, System, bodies, flush, launch_system, report, wait_until
from rendezvous import names
from rendezvous.bus.appender import AlreadyTaken, StreamAppender, StreamGone
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import Client, connect, connect_async
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration

TOKEN = "delete-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def bus(bus_url: str) -> Iterator[Client]:
    client = connect(bus_url)
    flush(client)
    yield client
    client.close()


def _deleted_demo(bus: Client, demo_registry: ModelRegistry, partitions: int) -> DeploymentStore:
    store = DeploymentStore(bus)
    dep = dataclasses.replace(demo_deployment(demo_registry, Schedule()), partitions=partitions)
    store.create(dep)
    return store


def test_the_purge_waits_for_every_group_and_an_append_in_between(
    bus: Client, demo_registry: ModelRegistry
) -> None:
    """Past the grace, a stream goes only once every group read and acknowledged all of it
    (the models' until their wait is over, the log bin's always); the state goes last, and a
    second look or a second bin finds nothing left to do."""
    store = _deleted_demo(bus, demo_registry, partitions=2)
    dep = store.get(DEMO_DEPLOYMENT)
    first, second = dep.input_streams
    bus.xadd(first, {b"e": b"1"})
    for kept in (names.labelled_stream, names.drift_history_stream, names.accuracy_history_stream):
        bus.xadd(kept(DEMO_DEPLOYMENT), {b"p": b"1"})  # read by one made again under the name
    store.delete(DEMO_DEPLOYMENT, actor="test", reason="gone")
    dep = store.get(DEMO_DEPLOYMENT)
    now = [dep.deleted_ms / 1000]
    purger = Purger(bus, grace_s=5, every_s=0, model_wait_s=60, clock=lambda: now[0])
    assert purger.look([dep]) == [] and bus.exists(first)  # within the grace
    now[0] += 6
    assert purger.look([dep]) == [] and bus.exists(first)  # nobody read the entry yet
    assert not bus.exists(second) or bus.xlen(second) == 0
    for group in dep.groups():  # every group reads it; the canary's leaves it pending
        bus.xreadgroup(group, "c", {first: ">"})
        if group != names.model_group("canary"):
            [entry] = bus.xrange(first)
            bus.xack(first, group, entry[0])
    assert purger.look([dep]) == [] and bus.exists(first)
    now[0] += 60  # the models' wait is over: the log bin's group alone holds it, and it is done
    assert purger.look([dep]) == [DEMO_DEPLOYMENT]
    left = [k for k in [*dep.input_streams, *serving_keys(DEMO_DEPLOYMENT)] if bus.exists(k)]
    assert left == [] and not bus.exists(names.labelled_stream(DEMO_DEPLOYMENT))
    assert DEMO_DEPLOYMENT not in store.list()
    assert [e["action"] for e in store.history(DEMO_DEPLOYMENT)][-1] == "delete"
    assert purger.look([dep]) == [DEMO_DEPLOYMENT]  # again: nothing left, nothing refused
    # A deployment made again under the name goes on from the history's last revision, and
    # a purger that still holds the old state leaves it alone.
    store.create(demo_deployment(demo_registry, Schedule()))
    again = store.get(DEMO_DEPLOYMENT)
    assert again.revision == dep.revision + 1 and not again.deleted_ms
    assert purger.look([dep]) == []
    assert store.get(DEMO_DEPLOYMENT).revision == again.revision
    assert all(bus.exists(s) for s in again.input_streams)


def test_jobs_no_gateway_read_end_failed_with_the_purge(
    bus_url: str, bus: Client, demo_registry: ModelRegistry
) -> None:
    """A job queued and never read (no gateway read the jobs stream before the purge) stayed
    pending until its TTL, and read so by a deployment made again under the name."""
    store = _deleted_demo(bus, demo_registry, partitions=1)
    dep = store.get(DEMO_DEPLOYMENT)

    async def queue() -> str:
        client = await connect_async(bus_url)
        try:
            jobs = JobStore(client, None, ttl_s=600, max_queued=10,  # type: ignore[arg-type]
                            max_held_bytes=2**20, ended=lambda *_: None)  # fmt: skip
            return (await jobs.accept(dep, b'{"instances": [[1.0]]}', None, 1)).id
        finally:
            await client.aclose()

    job = names.job_key(DEMO_DEPLOYMENT, asyncio.run(queue()))
    store.delete(DEMO_DEPLOYMENT, actor="test", reason="gone")
    dep = store.get(DEMO_DEPLOYMENT)
    purger = Purger(bus, grace_s=5, every_s=0, model_wait_s=60,
                    clock=lambda: dep.deleted_ms / 1000 + 6)  # fmt: skip
    assert bus.hget(job, "status") == b"pending"
    assert purger.look([dep]) == [DEMO_DEPLOYMENT]
    assert bus.hget(job, "status") == b"failed" and not bus.hexists(job, "body")
    error = json.loads(bus.hget(job, "error"))  # type: ignore[arg-type]
    assert error["status"] == 404 and "was deleted before the job ran" in error["detail"], error
    assert 0 < bus.ttl(job) <= 600


def test_an_earlier_partition_count_is_retired_once_drained(
    bus: Client, demo_registry: ModelRegistry
) -> None:
    """After a shrink from 3 partitions to 1, past the grace, the two streams published to no
    more are deleted once every group drained them, and only then leave the state."""
    store = _deleted_demo(bus, demo_registry, partitions=3)
    before = store.get(DEMO_DEPLOYMENT)
    _, shrunk = store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 1),
                             action="set-partitions", actor="test")  # fmt: skip
    old = before.input_streams[1:]
    assert shrunk.past_partitions == (3,) and shrunk.input_streams == before.input_streams
    bus.xadd(old[0], {b"e": b"1"})
    now = [shrunk.updated_ms / 1000 + 6]
    purger = Purger(bus, grace_s=5, every_s=0, model_wait_s=60, clock=lambda: now[0])
    assert purger.look([shrunk]) == []
    assert store.get(DEMO_DEPLOYMENT).past_partitions == (3,)
    assert all(bus.exists(s) for s in old)  # the empty one waits for the other: no gap
    for group in shrunk.groups():
        [(_, [(entry_id, _)])] = bus.xreadgroup(group, "c", {old[0]: ">"})
        bus.xack(old[0], group, entry_id)
    # Drained, but set to 3 again meanwhile: a purger that judged the state before leaves
    # the streams (published to again) and the history alone.
    store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 3), action="set-partitions",
                 actor="test")  # fmt: skip
    purger.look([shrunk])
    assert all(bus.exists(s) for s in old)
    assert store.history(DEMO_DEPLOYMENT)[-1]["action"] == "set-partitions"
    _, shrunk = store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 1),
                             action="set-partitions", actor="test")  # fmt: skip
    now[0] = shrunk.updated_ms / 1000 + 6
    purger.look([store.get(DEMO_DEPLOYMENT)])
    retired = store.get(DEMO_DEPLOYMENT)
    assert retired.past_partitions == () and retired.input_streams == [before.input_streams[0]]
    assert not any(bus.exists(s) for s in old) and bus.exists(before.input_streams[0])
    assert store.history(DEMO_DEPLOYMENT)[-1]["detail"] == {"partitions": 3}
    ensure_groups(bus, store.get(DEMO_DEPLOYMENT))  # a reader's check makes none again
    ensure_groups(bus, shrunk)  # nor does one that still holds the state before
    assert not any(bus.exists(s) for s in old)


def test_a_deleted_deployment_is_refused_every_change_and_a_new_create_until_purged(
    bus: Client, demo_registry: ModelRegistry
) -> None:
    store = _deleted_demo(bus, demo_registry, partitions=1)
    store.delete(DEMO_DEPLOYMENT, actor="test")
    with pytest.raises(DeploymentNotFound, match="was deleted at"):
        store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 2), action="x", actor="t")
    with pytest.raises(DeploymentNotFound, match="was deleted at"):
        store.delete(DEMO_DEPLOYMENT, actor="test")
    with pytest.raises(DeploymentConflict, match="still draining"):
        store.create(demo_deployment(demo_registry, Schedule()))
    # Its groups are followed without making a stream that was purged.
    stream = store.get(DEMO_DEPLOYMENT).input_streams[0]
    bus.delete(stream)
    ensure_groups(bus, store.get(DEMO_DEPLOYMENT))
    assert not bus.exists(stream)


async def test_an_append_to_a_purged_stream_fails_and_takes_nothing(bus_url: str) -> None:
    """NOMKSTREAM: a gateway that has not yet seen a delete gets StreamGone (a 503), its
    caller's request id is not taken, and no stream is made that no reader would look at;
    an append to a live stream is as before."""
    client = connect(bus_url)
    async_client = await connect_async(bus_url)
    router = Router(async_client, timeout_s=2.0)
    appender = StreamAppender(router)
    stream = names.input_stream("purged")
    errors: list[Exception] = []
    try:
        appender.append_nowait(stream, {b"a": b"1"}, on_error=errors.append, must_exist=True)
        key = names.request_id_key(stream, "rid-1")
        appender.append_nowait(stream, {b"a": b"2"}, on_error=errors.append, must_exist=True,
                               unique=(key, 60_000))  # fmt: skip
        await appender.close()
        assert [type(e) for e in errors] == [StreamGone, StreamGone], errors
        assert not client.exists(stream) and not client.exists(key)
        client.xgroup_create(stream, "g", id="0", mkstream=True)
        appender = StreamAppender(router)
        appender.append_nowait(stream, {b"a": b"3"}, on_error=errors.append, must_exist=True,
                               unique=(key, 60_000))  # fmt: skip
        appender.append_nowait(stream, {b"a": b"4"}, on_error=errors.append, must_exist=True,
                               unique=(key, 60_000))  # fmt: skip
        await appender.close()
        assert client.xlen(stream) == 1 and isinstance(errors[-1], AlreadyTaken)
    finally:
        client.delete(stream, names.request_id_key(stream, "rid-1"))
        client.close()
        await router.close()
        await async_client.aclose()


def test_a_purged_deployment_whose_model_is_gone_exports_under_generic_names(
    r: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its real model deleted from the registry too, its archive could not be exported at
    all; an enriched one's exported without its entity columns (a helper's probe)."""
    from gateway.cli.export import _as_last_served

    writer = SegmentWriter(tmp_path)
    looked = [{"entity": "c-1", "found": True, "values": {"b": 2.0}}]
    writer.append_batch("gone", [{"stream_id": "1-0", "request_id": "r-1", "enqueued_ms": 1.0,
                                  "features": [[1.0, 2.0, 3.0]], "looked_up": looked}])  # fmt: skip
    writer.close()
    store = DeploymentStore(r)
    gone = DeploymentNotFound("deployment 'gone' does not exist")
    names_, real, entity_key = _as_last_served(store, ModelRegistry(tmp_path / "models"),
                                               ArchiveReader(tmp_path), "gone", gone)  # fmt: skip
    assert names_ == ("feature_0", "feature_1", "feature_2") and real is None
    assert entity_key is not None
    assert "its 3 features are named feature_0 ..." in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no request of it is archived"):
        _as_last_served(store, ModelRegistry(tmp_path / "models"), ArchiveReader(tmp_path),
                        "never", gone)  # fmt: skip


# -- the whole system ----------------------------------------------------------------------------


@pytest.fixture
def system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, Schedule(),
                       RDV_ADMIN_TOKEN=TOKEN, RDV_DRAIN_GRACE_S="5") as sys:  # fmt: skip
        yield sys


def test_a_deployment_deleted_under_load_answers_what_it_took_and_is_purged(
    system: System, request: pytest.FixtureRequest
) -> None:
    store = DeploymentStore(system.r)
    store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 3), action="set-partitions",
                 actor="test")  # fmt: skip
    dep = store.get(DEMO_DEPLOYMENT)
    system.start_worker("real")
    system.start_worker("canary")
    system.start("logbin-1", "logbin", "--consumer", "logbin-1")  # a second bin: one purges
    time.sleep(1.2)  # the gateway's deployment cache follows within a second
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=6, prefix="del") as load:
        time.sleep(2.5)
        deleted = system.http.delete(f"/admin/deployments/{DEMO_DEPLOYMENT}",
                                     params={"reason": "retired"}, headers=AUTH)  # fmt: skip
        time.sleep(1.0)
    assert deleted.status_code == 202, deleted.text
    assert deleted.json()["deployment"]["deleted_ms"] > 0
    ok = load.ok_ids()
    statuses = {r["status"] for r in load.results}
    # Purged once drained: the streams, the state, the name; the history stays.
    wait_until(lambda: DEMO_DEPLOYMENT not in store.list(), 30, "the purge")
    archived = [r["request_id"]
                for r in ArchiveReader(system.data_dir / "logbin").records(DEMO_DEPLOYMENT)
                if "request_id" in r]  # fmt: skip
    figures = {**load.figures(), "archived": len(archived), "missing": len(ok - set(archived))}
    report(f"deleted under load ({request.node.callspec.id})", figures)
    assert statuses == {200, 404}, figures  # answered, or refused after the delete: never lost
    assert ok and ok <= set(archived) and len(archived) == len(set(archived)), figures
    keys = [*dep.input_streams, *serving_keys(DEMO_DEPLOYMENT)]
    assert [k for k in keys if system.r.exists(k)] == []
    time.sleep(2.0)  # the other bin and the workers meet the streams gone: none made again
    assert [k for k in keys if system.r.exists(k)] == []
    refused = system.predict(bodies(1)[0])
    assert refused.status_code == 404 and "does not exist" in refused.json()["detail"]
    shown = system.http.get(f"/admin/deployments/{DEMO_DEPLOYMENT}", headers=AUTH)
    assert shown.status_code == 404
    listed = system.http.get("/admin/deployments", headers=AUTH).json()["deployments"]
    assert DEMO_DEPLOYMENT not in [d["name"] for d in listed]
    history = system.http.get(f"/admin/deployments/{DEMO_DEPLOYMENT}/history", headers=AUTH)
    last = history.json()["history"][-1]
    assert (last["action"], last["reason"]) == ("delete", "retired")
    # Its archive exports still, named by the features its real model took when deleted (the
    # state went with the purge, and the export was refused: a helper's probe).
    out = system.data_dir / "deleted.csv"
    done = subprocess.run([sys.executable, "-m", "gateway.cli.main", "archive", "export",
                           "--deployment", DEMO_DEPLOYMENT, "--data-dir", str(system.data_dir),
                           "--out", str(out)], env=system.env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with out.open(newline="") as f:
        exported = list(csv.DictReader(f))
    assert {r["request_id"] for r in exported} == set(archived)
    assert demo_data().names[0] in exported[0]
    # its decision records and kept outcomes went with it: who answered is not known (empty),
    # where it read as no answer at all (a helper's probe)
    assert {r["answered_by"] for r in exported} == {""}
    # Its workers stopped by themselves once their streams were gone.
    for role in ("real", "canary"):
        wait_until(lambda r=role: not system.procs[r].alive(), 15, f"the {role} worker's end")
    # Made again under its name: a new life, its history continued, served again.
    registry = ModelRegistry(system.data_dir / "models")
    store.create(demo_deployment(registry, Schedule()))
    assert store.get(DEMO_DEPLOYMENT).revision == last["revision"] + 1
    for role in ("real", "canary"):
        system.stop(role)
    system.start_worker("real")
    wait_until(lambda: system.predict(bodies(1)[0]).status_code == 200, 15, "served again")
