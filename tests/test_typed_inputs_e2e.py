"""Models converted with skl2onnx's ``Int64TensorType`` and ``DoubleTensorType`` served end to
end: uploaded through the admin API of a real gateway (an int64 input was refused there),
scored by a real worker host on a real Redis, answered as scikit-learn answers, a value an
integer model cannot take refused with a 422 naming it, and archived by the log bin exactly as
the models saw it (a double model saw 16777217 as 16777216, float32's nearest)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from admin_support import AUTH, TOKEN
from typed_models import NAMES, counts, fitted, upload

from models.archive import ArchiveReader
from models.archive_slice import resolve
from models.export import Exporter
from processes import System, launch_system, wait_until
from rendezvous import names
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration

SCHEDULE = Schedule(real_deadline_ms=2000, timeout_ms=5000, fallbacks=("canary",), grace_ms=500)
BIG = 16777217
"""The first integer float32 cannot hold."""


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE, own_models=True,
                       RDV_ADMIN_TOKEN=TOKEN) as sys:  # fmt: skip
        sys.start("workers", "worker", "--roles", "all")
        yield sys


def admin(sys: System, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = sys.http.post(path, json=body, headers=AUTH)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()  # type: ignore[no-any-return]


def live(sys: System, deployment: str, roles: set[str]) -> bool:
    members = sys.r.zrangebyscore(names.workers_key(deployment), time.time() - 1.5, "+inf")
    return roles <= {m.decode().split("|", 1)[0] for m in members}


def archived(sys: System, deployment: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    def found() -> dict[str, dict[str, Any]] | None:
        reader = ArchiveReader(sys.data_dir / "logbin")
        records = {r.get("request_id"): r for r in reader.records(deployment)}
        return {i: records[i] for i in ids} if ids <= set(records) else None

    return wait_until(found, 20, f"{deployment}'s archive")  # type: ignore[no-any-return]


def exported(sys: System, deployment: str, out: Path) -> tuple[str, dict[str, list[Any]]]:
    """The Parquet export of the deployment's whole archive: its feature columns' type, and
    each feature's values by request id and row."""
    import pyarrow.parquet as pq

    reader = ArchiveReader(sys.data_dir / "logbin")
    positions = resolve(reader, deployment, from_ms=None, to_ms=time.time() * 1000)
    doc = Exporter(sys.r, reader, deployment, NAMES, [0, 1]).export(positions, out, "parquet", {})
    table = pq.read_table(out)
    assert {str(table.schema.field(n).type) for n in NAMES} == {
        {"float32": "float", "float64": "double"}.get(doc["features_type"], doc["features_type"])
    }
    return doc["features_type"], table.to_pydict()


def record(sys: System, deployment: str, rid: str) -> DecisionRecord:
    def found() -> DecisionRecord | None:
        entries = sys.r.xrange(names.decisions_stream(deployment))
        return next((d for d in decode_entries(entries) if d.request_id == rid), None)

    return wait_until(found, 15, "the decision record")  # type: ignore[no-any-return]


def test_a_double_model_sees_and_archives_each_value_as_sent(system: System) -> None:
    """A ``DoubleTensorType`` model was served float32 rows cast up: 16777217 reached it, and
    the archive, as 16777216, and 0.1 as 0.10000000149."""
    doubles = admin(system, "/admin/models", upload("double", "exact-double"))
    real = {"model": "exact-double", "version": doubles["version"]}
    exact = admin(system, "/admin/deployments", {"name": "exact", "real": real})
    wait_until(lambda: live(system, "exact", {"real"}), 30, "the worker host's role")
    rows = [[0.1, 5.5, BIG], [3, 4, 5]]
    resp = system.http.post("/v1/deployments/exact/predict", json={"instances": rows},
                            headers={"X-Request-Id": "doubles-1"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    kept = archived(system, "exact", {"doubles-1"})["doubles-1"]
    assert kept["features"] == rows and kept["features_type"] == "float64"
    # and exported for retraining exactly as archived (Parquet's float32 rounded them)
    kind, columns = exported(system, "exact", system.logs / "exact.parquet")
    assert kind == "float64" and [columns[n][:2] for n in NAMES] == [
        list(c) for c in zip(*rows, strict=True)
    ]
    got = [[p["probabilities"]["0"], p["probabilities"]["1"]] for p in resp.json()["predictions"]]
    assert np.allclose(got, fitted().predict_proba(np.array(rows)), atol=1e-5)
    assert doubles["input_type"] == "float64" and exact["input_types"] == ["float64"]


def test_an_int64_model_serves_integers_and_refuses_what_it_cannot_take(system: System) -> None:
    """An ``Int64TensorType`` model was refused at upload ("the model's input is
    tensor(int64)"). Here it is real, a double model of the same fit its canary."""
    ints = admin(system, "/admin/models", upload("int64", "counts-int"))
    doubles = admin(system, "/admin/models", upload("double", "counts-double"))
    assert ints["input_type"] == "int64"
    both = admin(system, "/admin/deployments", {
        "name": "counts", "real": {"model": "counts-int", "version": ints["version"]},
        "canary": {"model": "counts-double", "version": doubles["version"]}})  # fmt: skip
    assert both["input_types"] == ["float64", "int64"]
    wait_until(lambda: live(system, "counts", {"real", "canary"}), 30, "the worker host's roles")

    # integers: answered as scikit-learn answers, by the int64 model, the double one beside it
    x, _ = counts()
    rows = [*x[:5].tolist(), [BIG, 3, 1]]
    resp = system.http.post("/v1/deployments/counts/predict", json={"instances": rows},
                            headers={"X-Request-Id": "ints-1"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model"]["name"] == "counts-int"
    want = fitted().predict_proba(np.array(rows, np.int64))
    got = [[p["probabilities"]["0"], p["probabilities"]["1"]] for p in answer["predictions"]]
    assert np.allclose(got, want, atol=1e-5)
    decision = record(system, "counts", "ints-1")
    assert set(decision.outputs) == {"real", "canary"} and not decision.failed
    assert decision.outputs["real"].labels == decision.outputs["canary"].labels
    kept = archived(system, "counts", {"ints-1"})["ints-1"]
    assert kept["features_type"] == "int64" and kept["features"] == rows
    kind, columns = exported(system, "counts", system.logs / "counts.parquet")
    assert kind == "int64" and [columns[n][:6] for n in NAMES] == [
        list(c) for c in zip(*rows, strict=True)
    ]

    # what an integer model cannot take: a 422 naming row and column, nothing published
    bad = system.http.post("/v1/deployments/counts/predict",
                           json={"instances": [[1, 2, 3], [4, 5.5, 6]]})  # fmt: skip
    assert bad.status_code == 422, bad.text
    [fault] = bad.json()["detail"]
    assert fault["loc"] == ["body", "instances", 1, 1]
    assert fault["msg"] == "row 1, 'clicks': 5.5 is not an integer (a model takes int64)"
    by_name = {"features": dict(zip(NAMES, [2**60, 1, 1], strict=True))}
    huge = system.http.post("/v1/deployments/counts/predict", json=by_name)
    assert huge.status_code == 422 and "visits" in huge.text and "beyond" in huge.text
    oip = system.http.post("/v2/models/counts/infer", json={"inputs": [
        {"name": "input", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 0.25]}]})  # fmt: skip
    assert oip.status_code == 422 and "'days': 0.25 is not an integer" in oip.text
    [declared] = system.http.get("/v2/models/counts").json()["inputs"]
    assert declared["datatype"] == "INT64"  # FP32 would round the integers past 2**24
    oip = system.http.post("/v2/models/counts/infer", json={"inputs": [
        {"name": "input", "shape": [1, 3], "datatype": "INT64", "data": rows[-1]}]})  # fmt: skip
    assert oip.status_code == 200, oip.text
    [label] = [o["data"] for o in oip.json()["outputs"] if o["name"] == "label"]
    assert label == fitted().predict(np.array([rows[-1]], np.int64)).tolist()
