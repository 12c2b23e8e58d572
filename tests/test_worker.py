"""The model worker against a real Redis server and the real demo ONNX models."""

import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, demo_data
from models.worker import ModelWorker, WorkerStats, batch_wait_s
from rendezvous import names
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.envelope import ModelResult, RequestEnvelope, decode_results
from rendezvous.schedule import Schedule

REPLY = names.reply_stream("test-gw")


def setup(r: redis.Redis, registry: ModelRegistry) -> None:
    DeploymentStore(r).create(demo_deployment(registry, Schedule()))
    r.xadd(REPLY, {b"hello": b"1"})


def publish(
    r: redis.Redis,
    rid: str,
    x: np.ndarray,
    deadline_ms: float | None = None,
    reply_to: str = REPLY,
) -> None:
    now = time.time() * 1000
    env = RequestEnvelope(
        request_id=rid,
        deployment=DEMO_DEPLOYMENT,
        reply_to=reply_to,
        deadline_ms=int(deadline_ms if deadline_ms is not None else now + 60_000),
        enqueued_ms=now,
        raw=b"{}",
        features=x,
        spec_version="fs-test",
    )
    r.xadd(names.input_stream(DEMO_DEPLOYMENT), env.encode())


def replies(r: redis.Redis) -> list[ModelResult]:
    """Every result on the reply stream, in order (a worker writes one entry per batch)."""
    out: list[ModelResult] = []
    for _id, fields in r.xrange(REPLY):
        if b"hello" not in fields:
            batch, errors = decode_results(fields)
            assert errors == []
            out += batch
    return out


def results(r: redis.Redis) -> dict[str, ModelResult]:
    return {res.request_id: res for res in replies(r)}


def make_worker(r: redis.Redis, registry: ModelRegistry, role: str, **kw: object) -> ModelWorker:
    return ModelWorker(r, registry, deployment=DEMO_DEPLOYMENT, role=role, consumer=f"{role}-t",
                       **kw)  # type: ignore[arg-type]  # fmt: skip


def test_worker_scores_a_batch_in_one_call_and_matches_onnxruntime(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    x = demo_data().x_test[:12]
    for i in range(6):
        publish(r, f"req-{i}", x[2 * i : 2 * i + 2])
    worker = make_worker(r, demo_registry, "real", batch_size=64)
    assert worker.drain() == 6
    assert worker.stats.scored == 6 and worker.stats.batches == 1

    direct = OnnxClassifier(
        demo_registry.artifact_path("breast-cancer", 2), demo_registry.meta("breast-cancer", 2)
    )
    labels, proba = direct.predict(x)
    got = results(r)
    assert sorted(got) == [f"req-{i}" for i in range(6)]
    for i in range(6):
        res = got[f"req-{i}"]
        assert (res.model, res.version, res.role) == ("breast-cancer", 2, "real")
        assert res.labels == labels[2 * i : 2 * i + 2].tolist()
        np.testing.assert_allclose(res.probabilities, proba[2 * i : 2 * i + 2], rtol=1e-6)
        assert res.model_latency_ms > 0 and res.queue_ms >= 0
    pending = r.xpending(names.input_stream(DEMO_DEPLOYMENT), names.model_group("real"))
    assert pending["pending"] == 0
    # Each request is given its rows' share of the one onnxruntime call, not the whole call.
    total_ms = sum(res.model_latency_ms for res in got.values())
    assert total_ms == pytest.approx(worker.stats.inference_s * 1000, rel=1e-6)


def test_workers_of_one_process_share_one_run_limit_thread(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    """A worker host made a watcher thread for every model it ever served, never ended: 281
    after a helper's churn of deployments."""
    import threading

    def watchers() -> int:
        return sum(t.name == "model-run-limit" for t in threading.enumerate())

    setup(r, demo_registry)
    x = demo_data().x_test[:2]
    before = watchers()  # an earlier test of this process may have started the one
    for i in range(4):
        publish(r, f"req-{i}", x)
        make_worker(r, demo_registry, "real" if i % 2 else "canary").drain()
    assert watchers() - before <= 1


def test_a_worker_rides_out_a_state_it_cannot_read(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    """A state a newer version wrote, met when a consumer group vanished or a host asked for
    another role: it ended the worker's loop (found by a review). Served as it was instead."""
    setup(r, demo_registry)
    worker = make_worker(r, demo_registry, "real")
    worker.load()
    key = names.deployment_key(DEMO_DEPLOYMENT)
    r.set(key, r.get(key).replace(b'"roles"', b'"rolez"'))  # type: ignore[union-attr]
    assert worker.failed(redis.ResponseError("NOGROUP No such key or consumer group"), 0.1)
    worker.serve_roles({"canary": "canary-t"})
    worker.streams_to_read()  # the new role waits for a state it can read
    assert set(worker.roles) == {"real"}


def test_a_batch_owes_each_gateway_one_reply_entry(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    other = names.reply_stream("test-gw-2")
    r.xadd(other, {b"hello": b"1"})
    x = demo_data().x_test[:5]
    for i in range(5):
        publish(r, f"req-{i}", x[i : i + 1], reply_to=REPLY if i % 2 == 0 else other)
    assert make_worker(r, demo_registry, "real", batch_size=64).drain() == 5
    for stream, expected in ((REPLY, ["req-0", "req-2", "req-4"]), (other, ["req-1", "req-3"])):
        entries = [fields for _id, fields in r.xrange(stream) if b"hello" not in fields]
        assert len(entries) == 1
        batch, errors = decode_results(entries[0])
        assert [res.request_id for res in batch] == expected and errors == []


def test_the_reply_cap_counts_results_not_batches(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    x = demo_data().x_test[:1]
    for i in range(300):
        publish(r, f"req-{i}", x)
    worker = make_worker(r, demo_registry, "real", batch_size=10, reply_maxlen=100)
    assert worker.drain() == 300 and worker.stats.batches == 30
    kept = replies(r)
    # MAXLEN ~ trims whole nodes only: about 100 results (10 entries) stay, never the 300
    assert 100 <= len(kept) <= 150
    assert kept[-1].request_id == "req-299"


def test_canary_worker_serves_version_1_from_the_same_stream(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    publish(r, "one", demo_data().x_test[:1])
    make_worker(r, demo_registry, "real").drain()
    make_worker(r, demo_registry, "canary").drain()
    versions = sorted((res.role, res.version) for res in replies(r))
    assert versions == [("canary", 1), ("real", 2)]


def test_expired_and_malformed_entries_are_acked_and_counted_not_scored(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    x = demo_data().x_test[:1]
    publish(r, "late", x, deadline_ms=time.time() * 1000 - 1)
    r.xadd(names.input_stream(DEMO_DEPLOYMENT), {b"d": b"garbage"})
    publish(r, "fine", x)
    worker = make_worker(r, demo_registry, "real")
    assert worker.drain() == 3
    assert worker.stats.expired == 1 and worker.stats.malformed == 1 and worker.stats.scored == 1
    assert list(results(r)) == ["fine"]
    pending = r.xpending(names.input_stream(DEMO_DEPLOYMENT), names.model_group("real"))
    assert pending["pending"] == 0


def test_wrong_width_gets_an_error_result_not_a_crash(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    publish(r, "narrow", np.ones((1, 5), np.float32))
    publish(r, "fine", demo_data().x_test[:1])
    make_worker(r, demo_registry, "real").drain()
    got = results(r)
    assert not got["narrow"].ok and "30 features" in (got["narrow"].error or "")
    assert got["fine"].ok


def test_a_non_finite_answer_is_the_models_failure_for_that_request_only(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    """Rows near float32's bound (finite, so taken) overflow the canary's scaler into NaN:
    the record kept NaN probabilities, a real doing so answered 502 and poisoned the live
    accuracy (found by hand). A model's non-finite answer is now its failure for that request
    (the schedule's fallback answers); the other requests of the batch stand."""
    setup(r, demo_registry)
    huge = demo_data().x_test[:2].astype(np.float32)
    huge[1] = 3.4e38
    publish(r, "fine", demo_data().x_test[:1])
    publish(r, "huge", huge)
    worker = make_worker(r, demo_registry, "canary")
    worker.drain()
    got = results(r)
    assert got["fine"].ok and np.isfinite(got["fine"].probabilities).all()
    assert not got["huge"].ok and got["huge"].error == (
        "model answered a non-finite probability (row 1)"
    )
    assert worker.stats.scored == 1 and worker.stats.errors == 1


def test_workers_long_silent_leave_the_worker_set(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    """Every worker restart under a new name (``rdv worker``'s default holds its pid) and
    every removed role left its member in the deployment's worker set for good (found by
    hand); a heartbeat now drops members silent for ``FORGET_WORKERS_S``."""
    from models.role_model import FORGET_WORKERS_S, RoleModel

    setup(r, demo_registry)
    workers = names.workers_key(DEMO_DEPLOYMENT)
    now = time.time()
    r.zadd(workers, {"real|gone-1": now - FORGET_WORKERS_S - 5, "ch|removed": now - 60})
    role = RoleModel(demo_registry, DEMO_DEPLOYMENT, "real", "real-t")
    for cmd in role.heartbeat(now):
        r.execute_command(*cmd.args)
    assert sorted(r.zrange(workers, 0, -1)) == [b"ch|removed", b"real|real-t"]


def test_no_reply_stream_is_created_for_a_gateway_that_is_gone(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    r.delete(REPLY)
    publish(r, "orphan", demo_data().x_test[:1])
    assert make_worker(r, demo_registry, "real").drain() == 1
    assert not r.exists(REPLY)


def test_entries_of_a_dead_consumer_are_claimed_and_scored(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    stream, group = names.input_stream(DEMO_DEPLOYMENT), names.model_group("real")
    for i in range(3):
        publish(r, f"stuck-{i}", demo_data().x_test[i : i + 1])
    r.xreadgroup(group, "dead-consumer", {stream: ">"}, count=10)  # read, never acked
    time.sleep(0.15)
    worker = make_worker(r, demo_registry, "real", claim_idle_ms=100)
    worker.drain()
    assert worker.stats.reclaimed == 3
    assert sorted(results(r)) == ["stuck-0", "stuck-1", "stuck-2"]
    assert r.xpending(stream, group)["pending"] == 0


def test_worker_follows_a_change_of_its_role(r: redis.Redis, demo_registry: ModelRegistry) -> None:
    setup(r, demo_registry)
    worker = make_worker(r, demo_registry, "real", heartbeat_s=0.0)
    worker.load()
    assert worker.model_ref is not None and worker.model_ref.version == 2
    from models.deployments import ModelRef

    swapped = {"real": ModelRef("breast-cancer", 1), "canary": ModelRef("breast-cancer", 2)}
    DeploymentStore(r).update(DEMO_DEPLOYMENT, lambda d: dataclasses.replace(d, roles=swapped),
                              action="test", actor="test")  # fmt: skip
    worker.step(block_ms=None)  # the revision rides along with every read
    assert worker.model_ref.version == 1
    publish(r, "after", demo_data().x_test[:1])
    worker.drain()
    assert worker.model_ref.version == 1 and worker.stats.reloads == 1
    assert results(r)["after"].version == 1
    members = r.zrange(names.workers_key(DEMO_DEPLOYMENT), 0, -1)
    assert b"real|real-t" in members


def _real_promoted_to_an_unloadable_version(
    r: redis.Redis, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch, retry_s: float
) -> tuple[ModelWorker, list[bool]]:
    """A real worker serving version 2, and real promoted to version 1, whose metadata cannot
    be read while ``broken[0]`` (its models folder lacks it); retried every ``retry_s``."""
    import models.worker
    from models.deployments import ModelRef

    monkeypatch.setattr(models.worker, "RELOAD_RETRY_S", retry_s)
    setup(r, registry)
    worker = make_worker(r, registry, "real", heartbeat_s=0.0)
    worker.load()
    real_meta = registry.meta
    broken = [True]

    def meta(name: str, version: int) -> object:
        if broken[0] and version == 1:
            raise FileNotFoundError("model breast-cancer version 1 is not in the registry")
        return real_meta(name, version)

    monkeypatch.setattr(registry, "meta", meta)
    swapped = {"real": ModelRef("breast-cancer", 1), "canary": ModelRef("breast-cancer", 2)}
    DeploymentStore(r).update(DEMO_DEPLOYMENT, lambda d: dataclasses.replace(d, roles=swapped),
                              action="test", actor="test")  # fmt: skip
    return worker, broken


def test_a_model_that_would_not_load_at_a_change_is_tried_again(
    r: redis.Redis, demo_registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried once only, a model that failed to load at a promotion left the old one answering
    as real for good, with nothing but a log line to say so (found by a helper's probe)."""
    worker, broken = _real_promoted_to_an_unloadable_version(r, demo_registry, monkeypatch, 0.05)
    worker.step(block_ms=None)
    assert worker.model_ref is not None and worker.model_ref.version == 2  # kept, for now
    failures = worker.load_failures
    time.sleep(0.1)
    worker.step(block_ms=None)
    assert worker.load_failures == failures + 1 and worker.model_ref.version == 2
    broken[0] = False
    time.sleep(0.1)
    worker.step(block_ms=None)
    assert worker.model_ref.version == 1 and worker._reload_at is None


def test_a_pending_entry_trimmed_from_the_stream_is_let_go(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    stream, group = names.input_stream(DEMO_DEPLOYMENT), names.model_group("real")
    publish(r, "trimmed", demo_data().x_test[:1])
    r.xreadgroup(group, "real-t", {stream: ">"}, count=10)  # ours, delivered, never acked
    [(entry_id, _)] = r.xrange(stream)
    r.xdel(stream, entry_id)
    worker = make_worker(r, demo_registry, "real")
    worker.drain()
    assert r.xpending(stream, group)["pending"] == 0
    assert worker.stats.malformed == 0 and results(r) == {}


def _published(r: redis.Redis, member: str) -> dict | None:  # type: ignore[type-arg]
    raw = r.hget(names.stats_key(DEMO_DEPLOYMENT), member)
    return None if raw is None else json.loads(raw)


def test_counters_ride_the_heartbeat_into_the_stats_hash(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    x = demo_data().x_test[:7]
    publish(r, "pair", x[:2])
    for i in range(5):
        publish(r, f"one-{i}", x[2 + i : 3 + i])
    publish(r, "late", x[:1], deadline_ms=time.time() * 1000 - 1)
    worker = make_worker(r, demo_registry, "canary", heartbeat_s=0.0)
    before = time.time()
    assert worker.drain() == 7
    doc = _published(r, "canary|canary-t")
    assert doc is not None
    assert doc["ts"] >= before
    assert (doc["model"], doc["version"]) == ("breast-cancer", 1)
    assert (doc["scored"], doc["rows"], doc["expired"], doc["batches"]) == (6, 7, 1, 1)
    assert doc["inference_s"] > 0 and doc["errors"] == 0 and doc["malformed"] == 0
    assert set(doc) == {"ts", "model", "version", *dataclasses.asdict(WorkerStats())}


def test_a_clean_stop_removes_the_published_counters(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    setup(r, demo_registry)
    worker = make_worker(r, demo_registry, "real", block_ms=50)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for i in range(3):
            publish(r, f"run-{i}", demo_data().x_test[i : i + 1])
        deadline = time.monotonic() + 10
        while len(results(r)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(results(r)) == 3
        assert _published(r, "real|real-t") is not None
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert _published(r, "real|real-t") is None


def test_only_roles_that_never_answer_first_wait_to_gather_a_batch() -> None:
    default = Schedule()
    assert batch_wait_s("real", default, 15.0) == 0.0
    assert batch_wait_s("canary", default, 15.0) == 0.015
    assert batch_wait_s("cand", default, 15.0) == 0.015
    split = Schedule(splits=(("cand", 0.1),))
    assert batch_wait_s("cand", split, 15.0) == 0.0  # it answers a share of the callers
    # The grace period always covers the wait four times over...
    assert batch_wait_s("cand", Schedule(grace_ms=20.0), 15.0) == 0.005
    assert batch_wait_s("canary", Schedule(grace_ms=0.0), 15.0) == 0.0
    # ...and a fallback has answered well before real's deadline passes.
    tight = Schedule(real_deadline_ms=15.0)
    assert batch_wait_s("canary", tight, 15.0) == 0.005
    assert batch_wait_s("cand", tight, 15.0) == 0.015


def test_a_canary_waits_after_a_short_read_and_real_never_does(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    # A roomy schedule, so the canary's wait (a third of real's deadline) is 1 s.
    roomy = Schedule(real_deadline_ms=3000.0, timeout_ms=5000.0, grace_ms=60_000.0)
    DeploymentStore(r).create(demo_deployment(demo_registry, roomy))
    r.xadd(REPLY, {b"hello": b"1"})
    x = demo_data().x_test
    workers = {role: make_worker(r, demo_registry, role, shadow_batch_wait_ms=10_000.0)
               for role in ("real", "canary")}  # fmt: skip
    paused: dict[str, list[float]] = {role: [] for role in workers}
    for role, worker in workers.items():
        worker._pause = paused[role].append
    publish(r, "a", x[:1])
    publish(r, "b", x[1:2])
    assert [w.step(block_ms=10) for w in workers.values()] == [2, 2]
    publish(r, "c", x[2:3])
    assert [w.step(block_ms=10) for w in workers.values()] == [1, 1]
    assert paused["real"] == []
    [delay_s] = paused["canary"]
    assert 0 < delay_s <= 1.0
    for worker in workers.values():  # the last batch's write waits for the next read
        worker.flush()
    scored = sorted((res.role, res.request_id) for res in replies(r))
    assert scored == [(role, rid) for role in ("canary", "real") for rid in "abc"]


def test_one_worker_serves_a_deployments_shadow_roles_in_one_read_and_one_reply(
    r: redis.Redis, demo_registry: ModelRegistry
) -> None:
    """The canary and a challenger in one worker: every request is scored by each with its
    own version, each gateway gets one reply entry a batch holding both roles' results, each
    role's own group is acked and each role heartbeats under its own member. The challenger
    removed (its group destroyed with it), the worker lets it go and the canary goes on."""
    store = DeploymentStore(r)
    dep = demo_deployment(demo_registry, Schedule())
    store.create(dataclasses.replace(dep, roles={**dep.roles, "ch1": dep.roles["real"]}))
    r.xadd(REPLY, {b"hello": b"1"})
    x = demo_data().x_test[:4]
    for i in range(4):
        publish(r, f"req-{i}", x[i : i + 1])
    worker = make_worker(r, demo_registry, "canary", batch_size=64)
    worker.serve_roles({"canary": "canary-t", "ch1": "ch1-t"})
    assert worker.drain() == 8  # each entry once for each role
    entries = [fields for _id, fields in r.xrange(REPLY) if b"hello" not in fields]
    assert len(entries) == 1
    batch, _ = decode_results(entries[0])
    assert sorted((res.role, res.version, res.request_id) for res in batch) == sorted(
        (role, version, f"req-{i}") for role, version in (("canary", 1), ("ch1", 2))
        for i in range(4)
    )  # fmt: skip
    stream = names.input_stream(DEMO_DEPLOYMENT)
    for role in ("canary", "ch1"):
        assert r.xpending(stream, names.model_group(role))["pending"] == 0
    groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)}
    last = r.xinfo_stream(stream)["last-generated-id"]
    assert all(groups[names.model_group(role)]["last-delivered-id"] == last
               for role in ("canary", "ch1"))  # fmt: skip
    assert {m.decode() for m in r.zrange(names.workers_key(DEMO_DEPLOYMENT), 0, -1)} >= {
        names.worker_member("canary", "canary-t"),
        names.worker_member("ch1", "ch1-t"),
    }
    assert worker.stats.scored == 4 and worker.roles["ch1"].stats.scored == 4

    store.update(
        DEMO_DEPLOYMENT,
        lambda d: dataclasses.replace(d, roles={k: v for k, v in d.roles.items() if k != "ch1"}),
        action="test",
        actor="t",
    )
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    try:
        publish(r, "req-after", x[:1])
        deadline = time.monotonic() + 10
        while worker.stats.scored < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.stats.scored == 5 and worker.serving_beside() == ()
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert names.worker_member("ch1", "ch1-t").encode() not in r.hgetall(
        names.stats_key(DEMO_DEPLOYMENT)
    )


@pytest.mark.integration
def test_a_gateway_whose_reply_node_is_lost_holds_up_no_other_gateway(
    rc: redis.RedisCluster, redis_cluster: LocalCluster, demo_registry: ModelRegistry
) -> None:
    """A batch answers two gateways whose reply streams live on different masters, and one of
    those masters is killed: the other gateway gets its results and every entry is acked in
    the same step (before, the step failed, and the worker backed off and retried it until
    the cluster elected a replica, holding up every gateway's answers meanwhile)."""
    DeploymentStore(rc).create(demo_deployment(demo_registry, Schedule()))
    home = rc.get_node_from_key(names.input_stream(DEMO_DEPLOYMENT)).name
    by_node: dict[str, str] = {}
    for i in range(64):
        stream = names.reply_stream(f"gw-{i}")
        by_node.setdefault(rc.get_node_from_key(stream).name, stream)
    lost_node, lost = next((node, s) for node, s in by_node.items() if node != home)
    kept = by_node[home]  # with the input stream, which stays
    for stream in (lost, kept):
        rc.xadd(stream, {b"hello": b"1"})
    x = demo_data().x_test[:6]
    for i in range(6):
        publish(rc, f"req-{i}", x[i : i + 1], reply_to=lost if i % 2 else kept)  # type: ignore[arg-type]
    port = int(lost_node.rsplit(":", 1)[1])
    worker = make_worker(rc, demo_registry, "real", batch_size=64)  # type: ignore[arg-type]
    try:
        redis_cluster.kill(port)
        assert worker.drain() == 6
        delivered = [res.request_id for _id, fields in rc.xrange(kept) if b"hello" not in fields
                     for res in decode_results(fields)[0]]  # fmt: skip
        assert sorted(delivered) == ["req-0", "req-2", "req-4"]
        group = names.model_group("real")
        assert rc.xpending(names.input_stream(DEMO_DEPLOYMENT), group)["pending"] == 0
        assert worker.stats.errors == 0
    finally:
        worker.close()
        if not redis_cluster.running(port):
            redis_cluster.restart(port)
        redis_cluster.wait_healthy(30.0)


def test_a_model_whose_file_changed_on_disk_is_refused_not_served(
    r: redis.Redis, demo_data_dir: Path, tmp_path: Path
) -> None:
    """Real's artifact overwritten on disk with another valid model (the canary's): the
    worker loaded and served it as real's version, its answers logged and judged as that
    version's. Its bytes no longer match the sha256 recorded at upload: refused, naming it."""
    from models.registry import ArtifactChanged

    shutil.copytree(demo_data_dir / "models", tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models")
    setup(r, registry)
    registry.artifact_path(DEMO_DEPLOYMENT, 2).write_bytes(
        registry.artifact_path(DEMO_DEPLOYMENT, 1).read_bytes()
    )
    with pytest.raises(ArtifactChanged, match=r"version 2: the artifact on disk .* is not the one"):
        make_worker(r, registry, "real").load()
    make_worker(r, registry, "canary").load()  # an intact one loads


def test_a_model_that_will_not_load_is_said_once_a_spell_not_at_every_retry(
    r: redis.Redis,
    demo_registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker host that cannot see a promoted version (its own models folder) retried every
    5 s and logged an ERROR each time (17 lines in 100 s, 720 an hour a role: a helper's probe
    of the stale-workers gauge, which now says it). Said when it starts, then as a spell
    (``RetryLog``), and when the version loads at last."""
    worker, broken = _real_promoted_to_an_unloadable_version(r, demo_registry, monkeypatch, 0.01)
    caplog.set_level(logging.INFO, logger="models.worker")
    worker.step(block_ms=None)
    for _ in range(6):
        time.sleep(0.02)
        worker.step(block_ms=None)
    assert worker.load_failures >= 7 and worker.model_ref is not None
    assert worker.model_ref.version == 2  # kept meanwhile
    said = [rec for rec in caplog.records if "cannot load breast-cancer:1" in rec.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, [r.getMessage() for r in said]
    assert "keeping breast-cancer:2" in said[0].getMessage()
    broken[0] = False
    time.sleep(0.02)
    worker.step(block_ms=None)
    assert worker.model_ref.version == 1
    again = [rec.getMessage() for rec in caplog.records if "working again" in rec.getMessage()]
    assert len(again) == 1 and "breast-cancer/real" in again[0], again
