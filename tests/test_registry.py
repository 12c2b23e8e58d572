"""The registry (artifacts on disk, index in Redis), the deployment store's revisions, history
and consumer groups, and workers following changes; real Redis, real ONNX models."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import onnx
import pytest
import redis
from admin_support import copy_demo_models, two_column_model, variant_onnx

from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import ModelRef, promoted, with_challenger, without_challenger
from models.inspection import ArtifactRejected, inspect_onnx
from models.meta import ModelMeta
from models.registry import ModelExists, ModelNotFound, ModelRegistry, ModelUnreadable
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, demo_data
from models.worker import ModelWorker
from rendezvous import names
from rendezvous.envelope import RequestEnvelope, decode_results
from rendezvous.schedule import Schedule

REPLY = names.reply_stream("registry-test")


@pytest.fixture
def registry(r: redis.Redis, demo_data_dir: Path, tmp_path: Path) -> ModelRegistry:
    data = copy_demo_models(demo_data_dir, tmp_path)
    return ModelRegistry(data / "models", index=r)


def draft(registry: ModelRegistry) -> ModelMeta:
    """Metadata for a new artifact (the demo's, without its sha256)."""
    return ModelMeta.from_dict({**registry.meta(DEMO_MODEL, 2).to_dict(), "sha256": ""})


def test_new_versions_are_unique_under_concurrency_and_shared_by_every_process(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    assert registry.adopt() and registry.adopt() == []
    other = ModelRegistry(registry.root, index=redis.Redis.from_url(_url(r)))
    stored: list[int] = []
    blob = variant_onnx("weak")

    def add() -> None:
        meta = ModelRegistry(registry.root, index=r).add(draft(registry), blob)
        stored.append(meta.version)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(stored) == [3, 4, 5, 6, 7, 8]
    assert [m.version for m in other.list(DEMO_MODEL)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert other.meta(DEMO_MODEL, 5).sha256 == other.list(DEMO_MODEL)[4].sha256
    assert other.verify(DEMO_MODEL, 5)


def _url(r: redis.Redis) -> str:
    kw = r.get_connection_kwargs()
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_adopt_skips_a_tampered_artifact_and_delete_removes_both_sides(
    registry: ModelRegistry, r: redis.Redis
) -> None:
    path = registry.artifact_path(DEMO_MODEL, 1)
    path.write_bytes(path.read_bytes() + b"tampered")
    assert [m.version for m in registry.adopt()] == [2]
    # retrained in place without Redis (train-demo --force): the index follows at next adopt
    retrained = ModelRegistry(registry.root).save(draft(registry), variant_onnx("weak"))
    assert registry.list(DEMO_MODEL)[0].sha256 != retrained.sha256
    assert [m.version for m in registry.adopt()] == [2]
    assert registry.list(DEMO_MODEL)[0].sha256 == retrained.sha256
    new = draft(registry)
    registry.delete(DEMO_MODEL, 2)
    assert not (registry.root / DEMO_MODEL / "2" / "model.onnx").exists()
    assert registry.list(DEMO_MODEL) == []
    with pytest.raises(ModelNotFound):
        registry.delete(DEMO_MODEL, 2)
    # the number stays taken: evidence kept under it is about the deleted artifact
    with pytest.raises(ModelExists, match="was deleted"):
        registry.add(new, variant_onnx("weak"), version=2)
    elsewhere = ModelRegistry(registry.root.parent / "other-host", index=r)  # no marker there
    with pytest.raises(ModelExists, match="was deleted"):
        elsewhere.add(new, variant_onnx("weak"), version=2)
    assert registry.add(new, variant_onnx("weak")).version == 3
    with pytest.raises(ValueError, match="invalid model name"):
        registry.delete("../x", 1)


@pytest.mark.parametrize(
    "damage", [b"{}", b"[1]", b'{"name": 1}', b"\xd4\xff", b"{", b"[" * 100_000]
)
def test_a_damaged_meta_json_is_named_by_its_path_and_the_other_versions_go_on(
    registry: ModelRegistry, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``meta.json`` that is not JSON, not UTF-8 or not a model's metadata was a KeyError,
    TypeError or UnicodeDecodeError naming no file, in ``rdv train-demo`` and in every worker
    of that version (found by a helper's probe). It is now a ``ModelUnreadable`` (a
    ``ModelNotFound``: as good as absent) naming its path, and adopting the data folder skips
    it with a warning and takes the other versions."""
    path = registry.root / DEMO_MODEL / "1" / "meta.json"
    path.write_bytes(damage)
    with pytest.raises(ModelUnreadable) as unreadable:
        registry.meta(DEMO_MODEL, 1)
    assert isinstance(unreadable.value, ModelNotFound) and str(path) in str(unreadable.value)
    assert "delete its folder, or upload the version again" in str(unreadable.value)
    assert [m.version for m in registry.adopt()] == [2]
    assert f"skipping model {DEMO_MODEL} version 1" in caplog.text


def _rejected(registry: ModelRegistry, data: bytes) -> str:
    with pytest.raises(ArtifactRejected) as info:
        inspect_onnx(data, draft(registry))
    return str(info.value)


def test_inspect_refuses_what_is_not_a_self_contained_onnx_classifier_of_the_spec(
    registry: ModelRegistry,
) -> None:
    import pickle

    assert "pickle" in _rejected(registry, pickle.dumps([1, 2, 3]))
    assert "zip" in _rejected(registry, b"PK\x03\x04 torch archive")
    assert "not an ONNX model" in _rejected(registry, b"\x00\x01garbage" * 10)
    assert "width is 10" in _rejected(registry, variant_onnx("narrow"))

    custom = onnx.load_model_from_string(variant_onnx("weak"))
    custom.opset_import.add(domain="com.example.native", version=1)
    assert "operator sets" in _rejected(registry, custom.SerializeToString())

    external = onnx.load_model_from_string(variant_onnx("weak"))
    tensor = external.graph.initializer.add()
    tensor.CopyFrom(onnx.helper.make_tensor("weights", onnx.TensorProto.FLOAT, [1], [0.0]))
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    assert "external data" in _rejected(registry, external.SerializeToString())

    sparse = onnx.load_model_from_string(variant_onnx("weak"))
    values = onnx.helper.make_tensor("sparse_values", onnx.TensorProto.FLOAT, [1], [0.0])
    values.ClearField("float_data")
    values.data_location = onnx.TensorProto.EXTERNAL
    entry = values.external_data.add()
    entry.key, entry.value = "location", "README.md"
    indices = onnx.helper.make_tensor("sparse_indices", onnx.TensorProto.INT64, [1], [0])
    sparse.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [4]))
    assert "external data" in _rejected(registry, sparse.SerializeToString())

    undeclared = onnx.load_model_from_string(variant_onnx("weak"))
    undeclared.graph.node[0].domain = "com.microsoft"  # not among the opset imports
    assert "com.microsoft" in _rejected(registry, undeclared.SerializeToString())

    assert "non-finite" in _rejected(
        registry, two_column_model(draft(registry).feature_spec.width, "Div", "ArgMax")
    )

    ok = inspect_onnx(
        variant_onnx("weak"),
        ModelMeta.from_dict({**draft(registry).to_dict(), "classes": [], "class_names": []}),
    )
    assert ok.classes == [0, 1] and ok.class_names == ["0", "1"]
    with pytest.raises(ArtifactRejected, match=r"classes \[0, 1, 2\] differ from the model's"):
        inspect_onnx(
            variant_onnx("weak"),
            ModelMeta.from_dict({**draft(registry).to_dict(), "classes": [0, 1, 2]}),
        )


# -- the deployment store ------------------------------------------------------------------------


def test_updates_bump_the_revision_keep_history_and_move_groups(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(registry, Schedule()), actor="setup", reason="first")
    stream = names.input_stream(DEMO_DEPLOYMENT)
    assert r.get(names.revision_key(DEMO_DEPLOYMENT)) == b"1"
    groups = {g["name"].decode(): g["last-delivered-id"] for g in r.xinfo_groups(stream)}
    assert groups == {"logbin": b"0-0", "model:real": b"0-0", "model:canary": b"0-0"}

    last = r.xadd(stream, {b"d": b"x"})
    ref = ModelRef(DEMO_MODEL, 3)
    before, after = store.update(
        DEMO_DEPLOYMENT,
        lambda d: with_challenger(d, "shadow", ref),
        action="add-challenger",
        actor="ana",
        reason="try it",
    )
    assert (before.revision, after.revision) == (1, 2)
    assert r.get(names.revision_key(DEMO_DEPLOYMENT)) == b"2"
    groups = {g["name"].decode(): g["last-delivered-id"] for g in r.xinfo_groups(stream)}
    assert groups["model:shadow"] == last

    store.update(
        DEMO_DEPLOYMENT,
        lambda d: without_challenger(d, "shadow"),
        action="remove-challenger",
        actor="ana",
    )
    assert "model:shadow" not in {g["name"].decode() for g in r.xinfo_groups(stream)}
    history = store.history(DEMO_DEPLOYMENT)
    assert [(h["revision"], h["action"], h["actor"]) for h in history] == [
        (1, "create", "setup"),
        (2, "add-challenger", "ana"),
        (3, "remove-challenger", "ana"),
    ]
    assert history[1]["changes"] == {"shadow": [None, "breast-cancer:3"]}
    assert store.state_at(DEMO_DEPLOYMENT, 2)["roles"]["shadow"] == ref.to_dict()
    assert store.history(DEMO_DEPLOYMENT, limit=1) == history[-1:]


def test_concurrent_updates_all_land_with_one_revision_each(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(registry, Schedule()))
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            DeploymentStore(redis.Redis.from_url(_url(r))).update(
                DEMO_DEPLOYMENT,
                lambda d: with_challenger(d, f"c{i}", ModelRef("m", i + 1)),
                action="add-challenger",
                actor=f"t{i}",
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    dep = store.get(DEMO_DEPLOYMENT)
    assert dep.revision == 9 and len(dep.challengers) == 8
    assert sorted(h["revision"] for h in store.history(DEMO_DEPLOYMENT)) == list(range(1, 10))


def test_role_since_is_when_the_role_got_its_current_version(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(registry, Schedule()))
    add = store.update(
        DEMO_DEPLOYMENT,
        lambda d: with_challenger(d, "s", ModelRef("m", 7)),
        action="add",
        actor="a",
    )[1]
    time.sleep(0.01)
    store.update(DEMO_DEPLOYMENT, lambda d: d, action="touch", actor="a")
    since = store.role_since_ms(DEMO_DEPLOYMENT, "s")
    assert since is not None and abs(since - add.updated_ms) < 50
    canary_since = store.role_since_ms(DEMO_DEPLOYMENT, "canary")
    assert canary_since == store.history(DEMO_DEPLOYMENT)[0]["ts_ms"]  # since the create
    assert store.role_since_ms(DEMO_DEPLOYMENT, "nobody") is None


# -- workers follow -----------------------------------------------------------------------------


def publish(r: redis.Redis, rid: str) -> None:
    now = time.time() * 1000
    env = RequestEnvelope(
        rid, DEMO_DEPLOYMENT, REPLY, int(now + 60_000), now, b"{}", demo_data().x_test[:1], "fs"
    )
    r.xadd(names.input_stream(DEMO_DEPLOYMENT), env.encode())


def versions(r: redis.Redis) -> dict[str, int]:
    out = {}
    for _id, fields in r.xrange(REPLY):
        if b"hello" not in fields:
            for res in decode_results(fields)[0]:
                out[res.request_id] = res.version
    return out


def test_a_worker_scores_with_the_new_version_on_its_first_read_after_a_promotion(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(registry, Schedule()))
    r.xadd(REPLY, {b"hello": b"1"})
    worker = ModelWorker(
        r, registry, deployment=DEMO_DEPLOYMENT, role="real", consumer="w", heartbeat_s=3600
    )
    publish(r, "before")
    worker.drain()
    store.update(
        DEMO_DEPLOYMENT, lambda d: promoted(d, ModelRef(DEMO_MODEL, 1)), action="promote", actor="t"
    )
    publish(r, "after")
    worker.drain()  # no heartbeat in between: the read itself carries the revision
    assert versions(r) == {"before": 2, "after": 1}
    assert worker.stats.reloads == 1


def test_a_worker_whose_role_is_removed_stops_by_itself(
    r: redis.Redis, registry: ModelRegistry
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(registry, Schedule()))
    v3 = registry.add(draft(registry), variant_onnx("weak")).version
    store.update(
        DEMO_DEPLOYMENT,
        lambda d: with_challenger(d, "shadow", ModelRef(DEMO_MODEL, v3)),
        action="add",
        actor="t",
    )
    worker = ModelWorker(
        redis.Redis.from_url(_url(r)),
        registry,
        deployment=DEMO_DEPLOYMENT,
        role="shadow",
        consumer="s",
        block_ms=100,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while worker.model is None and time.monotonic() < deadline:
            time.sleep(0.02)
        store.update(
            DEMO_DEPLOYMENT, lambda d: without_challenger(d, "shadow"), action="remove", actor="t"
        )
        thread.join(10)
        assert not thread.is_alive(), "the worker kept running for a role that is gone"
    finally:
        stop.set()
        thread.join(5)


def test_an_index_redis_lost_is_made_again_from_the_data_folder(
    registry: ModelRegistry, r: redis.Redis
) -> None:
    """Redis restarted without its data (or flushed): the admin API listed no model and
    refused every version as not in the registry until a gateway restarted (found by a
    helper's probe). The next look makes the index again."""
    assert [m.version for m in registry.adopt()] == [1, 2]
    r.flushdb()
    assert [m.version for m in registry.list(DEMO_MODEL)] == [1, 2]
    assert r.hlen(names.MODELS_INDEX) == 2
