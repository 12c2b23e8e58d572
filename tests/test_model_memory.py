"""A model that asks for gigabytes on some input (``ConstantOfShape`` sized by a feature, which
the upload's dry run never tried) fails that run instead of taking the host's memory: a worker
bounds its data memory (``RDV_MODEL_MEMORY_MB``, default half the host's), and only the
poisoned request fails; the requests read in the same batch are answered."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from admin_support import AUTH, TOKEN
from onnx import TensorProto, helper

from models.archive import ArchiveReader
from models.deployments import ModelRef
from models.memory_bound import bound_memory, default_mb, host_memory_mb
from models.meta import ModelMeta
from models.role_model import RoleModel
from models.runtime import OnnxClassifier
from processes import System, launch_system, wait_until
from rendezvous import names
from rendezvous.decision import decode_entries
from rendezvous.envelope import RequestEnvelope
from rendezvous.schedule import Schedule
from rendezvous.spec import FeatureSpec

FEATURES = ["a", "b"]
META = ModelMeta("bomb", 1, FeatureSpec.from_names(FEATURES), [0, 1], ["0", "1"], "", "")
POISON = 123456.0
"""The feature value that makes the model ask for memory: any other leaves it at 1 float."""


def bomb(floats: float) -> bytes:
    """x [rows, 2] -> argmax, softmax; a row whose first feature is ``POISON`` first makes
    a tensor of ``floats`` float32s (``floats`` x 4 bytes)."""
    nodes = [
        helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Equal", ["top", "poison"], ["hit"]),
        helper.make_node("Where", ["hit", "huge", "one"], ["size"]),
        helper.make_node("Reshape", ["size", "flat"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Softmax", ["x"], ["soft"], axis=1),
        helper.make_node("Add", ["soft", "nothing"], ["p"]),
    ]  # fmt: skip
    constants = [
        helper.make_tensor("poison", TensorProto.FLOAT, [], [POISON]),
        helper.make_tensor("huge", TensorProto.INT64, [], [int(floats)]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
    ]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, None),
         helper.make_tensor_value_info("p", TensorProto.FLOAT, None)], constants,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


EIGHT_GB = 2e9
"""Floats the poisoned run asks for: 8 GB, which an unbounded process on this host may get."""
NO_HOST = 2.5e14
"""1 PB: refused by any host, bounded or not (a test that runs without a bound)."""


@pytest.mark.pure
def test_a_bounded_process_refuses_a_models_gigabytes_and_runs_on(tmp_path: Path) -> None:
    """In a child process bounded to 1 GB beyond what it holds, the poisoned run fails at once
    (8 GB refused) and the next run answers; the bound is the process's soft RLIMIT_DATA."""
    (tmp_path / "bomb.onnx").write_bytes(bomb(EIGHT_GB))
    child = f"""
import resource, numpy as np
from models.memory_bound import bound_memory, held_bytes
from models.meta import ModelMeta
from models.runtime import OnnxClassifier
from rendezvous.spec import FeatureSpec
meta = ModelMeta("bomb", 1, FeatureSpec.from_names(["a", "b"]), [0, 1], ["0", "1"], "", "")
model = OnnxClassifier({str(tmp_path / "bomb.onnx")!r}, meta)
bound = bound_memory(1024)
held = held_bytes() >> 20
print(bound == resource.getrlimit(resource.RLIMIT_DATA)[0] >> 20, 0 <= bound - 1024 - held <= 1)
try:
    model.predict(np.array([[{POISON}, 0.0]], np.float32))
    print("ran")
except Exception as exc:
    print("failed", "allocate" in str(exc))
print(model.predict(np.array([[0.1, 0.9]], np.float32))[0].tolist())
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.stdout.split("\n")[:3] == ["True True", "failed True", "[1]"], done.stderr[-2000:]
    assert default_mb() == max(host_memory_mb() // 2, 256) and bound_memory(0) is None


@pytest.mark.pure
def test_in_a_container_the_default_is_half_its_limit(tmp_path: Path) -> None:
    """The machine's memory is the host's inside a container: half of it may be more than the
    container may take, and its own out-of-memory kill would come first."""
    machine = host_memory_mb(())
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text(f"{2 << 30}\n")
    assert host_memory_mb((v2, v1)) == min(machine, 2048)
    v2.write_text("max\n")
    v1.write_text(f"{1 << 30}\n")
    assert host_memory_mb((v2, v1)) == machine  # v2 present and unlimited: v1 is not read
    assert host_memory_mb((tmp_path / "none", v1)) == min(machine, 1024)


@pytest.mark.pure
def test_one_poisoned_request_fails_alone_not_its_batch() -> None:
    """A model failure on a batch failed every request read with it (the canary answered them
    all); now the batch's requests are scored each alone, and only the poisoned one fails."""
    role = RoleModel(None, "bombs", "real", "real-t")  # type: ignore[arg-type]
    role.model, role.model_ref = OnnxClassifier(bomb(NO_HOST), META), ModelRef("bomb", 1)

    def request(rid: str, rows: list[list[float]]) -> tuple[RequestEnvelope, float]:
        x = np.array(rows, np.float32)
        return RequestEnvelope(rid, "bombs", "reply", 1, 1.0, b"{}", x, "fs"), 0.5

    scored = role.score([request("before", [[0.9, 0.1]]),
                         request("poisoned", [[POISON, 0.0], [0.1, 0.2]]),
                         request("after", [[0.2, 0.3], [0.4, 0.1]])])  # fmt: skip
    by_id = {result.request_id: result for _, result in scored}
    assert "model failed" in (by_id["poisoned"].error or "")
    assert by_id["before"].labels == [0] and by_id["after"].labels == [1, 0]
    assert by_id["before"].ok and by_id["after"].ok
    assert (role.stats.errors, role.stats.scored) == (1, 2)


SCHEDULE = Schedule(real_deadline_ms=3000, timeout_ms=5000, fallbacks=("canary",), grace_ms=300)


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE, own_models=True,
                       RDV_ADMIN_TOKEN=TOKEN, RDV_MODEL_MEMORY_MB="1024") as sys:  # fmt: skip
        sys.start("workers", "worker", "--roles", "all")
        yield sys


def test_a_served_model_that_asks_for_gigabytes_fails_that_request_only(system: System) -> None:
    """A real worker host bounded to 1 GB serves a model that asks for 8 GB on one input: that
    request is answered by the canary (real's run was refused its memory), the host lives on,
    and real answers the next; a replay of the model over that request skips it alone."""
    for name in ("bomb", "plain"):
        data = bomb(EIGHT_GB if name == "bomb" else 1)
        body = {"name": name, "feature_names": FEATURES,
                "onnx_base64": base64.b64encode(data).decode()}  # fmt: skip
        assert system.http.post("/admin/models", json=body, headers=AUTH).status_code == 201
    create = {"name": "bombs", "real": {"model": "bomb", "version": 1},
              "canary": {"model": "plain", "version": 1}}  # fmt: skip
    assert system.http.post("/admin/deployments", json=create, headers=AUTH).status_code == 201

    def live() -> bool:
        members = system.r.zrangebyscore(names.workers_key("bombs"), time.time() - 1.5, "+inf")
        return {"real", "canary"} <= {m.decode().split("|", 1)[0] for m in members}

    wait_until(live, 30, "the worker host's roles")
    host = system.procs["workers"].proc.pid
    limits = Path(f"/proc/{host}/limits").read_text()
    [bound] = [
        int(line.split()[3]) >> 20 for line in limits.splitlines() if "Max data size" in line
    ]
    assert 1024 < bound < 1024 + 2048, bound  # a run's 1 GB beyond the host and its models
    predict = "/v1/deployments/bombs/predict"
    poisoned = system.http.post(predict, json={"instances": [[POISON, 0.0]]},
                                headers={"X-Request-Id": "poisoned-1"})  # fmt: skip
    assert poisoned.status_code == 200, poisoned.text
    assert poisoned.json()["model"]["role"] == "canary"
    after = system.http.post(predict, json={"instances": [[0.2, 0.7]]})
    assert after.status_code == 200 and after.json()["model"]["role"] == "real", after.text
    assert system.procs["workers"].alive()

    def failed_real() -> str | None:
        entries = system.r.xrange(names.decisions_stream("bombs"))
        record = next((d for d in decode_entries(entries) if d.request_id == "poisoned-1"), None)
        return None if record is None else (record.outputs["real"].error or "")

    assert "allocate" in wait_until(failed_real, 15, "the poisoned request's decision record")

    # A replay of the model on the archive (the poisoned request in it) is bounded alike: the
    # poisoned request is skipped as the model's failure, where unbounded it would have taken
    # 8 GB of the host, and the others are scored (the whole replay failed with the batch).
    reader = ArchiveReader(system.data_dir / "logbin")
    wait_until(lambda: len(list(reader.records("bombs"))) >= 2, 20, "the archive")
    replays = "/admin/deployments/bombs/replays"
    started = system.http.post(replays, json={"version": 1, "last": 10}, headers=AUTH)
    assert started.status_code == 202, started.text

    def ended() -> dict | None:
        report = system.http.get(f"{replays}/{started.json()['id']}", headers=AUTH).json()
        return None if report["state"] == "running" else report

    report = wait_until(ended, 30, "the replay's end")
    assert report["state"] == "done", report
    assert report["skipped"] == {"model_failed": 1} and report["records"] == 1, report
