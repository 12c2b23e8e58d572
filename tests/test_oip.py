"""The Open Inference Protocol routes on a running system (gateway, real and canary workers and
the log bin as ``rdv`` processes, a real Redis): ``tritonclient.http`` drives it unchanged, every
infer travels the rendezvous path (a decision record and an archive record each), and bad input
on every route is a clear 4xx that publishes nothing."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from models.archive import ArchiveReader
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import System, launch_system, stream_head, wait_until
from rendezvous import names
from rendezvous.decision import decode_entries
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=500, timeout_ms=2000, fallbacks=("canary",), grace_ms=100)
MODEL = DEMO_DEPLOYMENT
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE) as sys:
        yield sys


@pytest.fixture(scope="module")
def client(system: System) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{system.port}", network_timeout=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def workers(system: System) -> System:
    """Real and canary running for the rest of the module (``launch_system`` stops them)."""
    for role in ("real", "canary"):
        if role not in system.procs:
            system.start_worker(role)
    return system


def test_readiness_is_readyz(system: System, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert system.http.get("/readyz").status_code == 503  # no worker yet
    ready = system.http.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert not client.is_server_ready()
    assert not client.is_model_ready(MODEL)
    system.start_worker("real")  # the workers fixture finds it running
    wait_until(lambda: system.http.get("/readyz").status_code == 200, 10, "readyz")
    assert system.http.get("/v2/health/ready").json() == {"ready": True}
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
                 "/healthz", "/readyz", "/metrics", "/v2", f"/v2/models/{MODEL}"):  # fmt: skip
        head = system.http.head(path)  # some probes send HEAD: it was a 405 (on /metrics too)
        got = system.http.get(path)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert system.http.head("/v1/deployments/breast-cancer/predict").status_code == 405
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "2")  # real's version
    assert not client.is_model_ready(MODEL, "1")  # the canary's: no canary worker yet
    assert client.get_model_repository_index() == [  # it was a 404
        {"name": MODEL, "version": "2", "state": "READY", "reason": ""},
        {"name": MODEL, "version": "1", "state": "UNAVAILABLE",
         "reason": "no live worker for the role it holds (canary)"},
    ]  # fmt: skip
    index = system.http.post("/v2/repository/index", json={"ready": True})
    assert index.status_code == 200 and [e["version"] for e in index.json()] == ["2"]


def test_metadata(workers: System, client: triton.InferenceServerClient) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "rendezvous-gateway" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    width = len(demo_data().names)
    assert meta == {
        "name": MODEL,
        "versions": ["2", "1"],
        "platform": "onnxruntime",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
    }
    assert client.get_model_metadata(MODEL, "1")["name"] == MODEL
    assert client.is_model_ready(MODEL, "1")
    # Triton's model configuration (it was a 404): the rows are the batch dimension.
    assert client.get_model_config(MODEL) == {
        "name": MODEL,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 1000,  # RDV_MAX_ROWS
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [width]}],
        "output": [
            {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]},
        ],
    }
    assert client.get_model_config(MODEL, "1")["output"][1]["dims"] == [2]
    with pytest.raises(InferenceServerException, match="no version '9'"):
        client.get_model_config(MODEL, "9")


def _infer_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    dtype = "FP64" if x.dtype == np.float64 else "FP32"
    inp = triton.InferInput("input", list(x.shape), dtype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_tritonclient_infers_on_the_rendezvous_path(
    workers: System, client: triton.InferenceServerClient, demo_data_dir: Path
) -> None:
    x = demo_data().x_test[:12].astype(np.float32)
    registry = ModelRegistry(demo_data_dir / "models")
    real = OnnxClassifier(registry.artifact_path(MODEL, 2), registry.meta(MODEL, 2))
    canary = OnnxClassifier(registry.artifact_path(MODEL, 1), registry.meta(MODEL, 1))
    want_labels, want_proba = real.predict(x)
    # A versioned infer is answered by the version it names: the canary's rows by v1.
    canary_labels, canary_proba = canary.predict(x[9:12])
    want_labels[9:12], want_proba[9:12] = canary_labels, canary_proba
    assert not np.allclose(canary_proba, real.predict(x[9:12])[1], atol=1e-6)  # not real's
    json_outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    calls = {
        # the client's defaults: binary inputs, every output binary (binary_data_output)
        "oip-binary": dict(inputs=[_infer_input(x[0:3], True)]),
        "oip-json": dict(inputs=[_infer_input(x[3:6], False)], outputs=json_outputs),
        "oip-fp64": dict(inputs=[_infer_input(x[6:9].astype(np.float64), True)]),
        "oip-version-1": dict(inputs=[_infer_input(x[9:12], True)], model_version="1"),
    }
    rows = {"oip-binary": x[0:3], "oip-json": x[3:6], "oip-fp64": x[6:9],
            "oip-version-1": x[9:12]}  # fmt: skip
    for i, (rid, kwargs) in enumerate(calls.items()):
        result = client.infer(MODEL, request_id=rid, **kwargs)  # type: ignore[arg-type]
        response = result.get_response()
        pinned = rid == "oip-version-1"
        assert response["id"] == rid
        assert response["model_name"] == MODEL
        assert response["model_version"] == ("1" if pinned else "2")
        assert response["parameters"]["role"] == ("canary" if pinned else "real")
        labels, proba = result.as_numpy("label"), result.as_numpy("probabilities")
        assert labels.dtype == np.int64 and proba.dtype == np.float32
        at = slice(3 * i, 3 * i + 3)
        np.testing.assert_array_equal(labels, want_labels[at])
        np.testing.assert_allclose(proba, want_proba[at], atol=1e-6)
    only = client.infer(MODEL, [_infer_input(x[:1], True)],
                        outputs=[triton.InferRequestedOutput("probabilities")])  # fmt: skip
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
    assert only.as_numpy("label") is None

    def recorded() -> dict | None:
        entries = workers.r.xrange(names.decisions_stream(MODEL))
        found = {d.request_id: d for d in decode_entries(entries)}
        return found if set(calls) <= set(found) else None

    decisions = wait_until(recorded, 10, "decision records")
    for rid in calls:
        assert decisions[rid].outcome == ("pinned" if rid == "oip-version-1" else "real")
        assert set(decisions[rid].outputs) == {"real", "canary"}
    real_pinned = client.infer(MODEL, [_infer_input(x[:1], True)], model_version="2")
    assert real_pinned.get_response()["parameters"]["role"] == "real"

    def archived() -> dict | None:
        reader = ArchiveReader(workers.data_dir / "logbin")
        found = {r["request_id"]: r for r in reader.records(MODEL)}
        return found if set(calls) <= set(found) else None

    archive = wait_until(archived, 10, "archive records")
    for rid, sent in rows.items():
        np.testing.assert_array_equal(np.asarray(archive[rid]["features"], np.float32), sent)
        assert archive[rid]["raw"]["id"] == rid
    binary = archive["oip-binary"]
    assert base64.b64decode(binary["raw_binary"]) == x[0:3].tobytes()  # the body as sent
    assert archive["oip-json"]["raw"]["inputs"][0]["data"] == x[3:6].ravel().tolist()


def invalid_count(http: httpx.Client) -> float:
    """``rdv_requests_total{deployment=MODEL, outcome="invalid"}``."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "rdv_requests_total" and sample.labels == {
                "deployment": MODEL, "outcome": "invalid"}:  # fmt: skip
                return float(sample.value)
    return 0.0


def test_bad_input_is_a_clear_4xx_and_publishes_nothing(workers: System) -> None:
    http = workers.http
    width = len(demo_data().names)
    row = [1.0] * width

    def body(datatype: str = "FP32", shape: list[int] | None = None, data: list | None = None,
             name: str = "input") -> dict:  # fmt: skip
        return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [1, width],
                            "data": row if data is None else data}]}  # fmt: skip

    binary_input = {"name": "input", "datatype": "FP32", "shape": [1, width],
                    "parameters": {"binary_data_size": 4 * width}}  # fmt: skip
    head = json.dumps({"inputs": [binary_input]}).encode()
    blob = np.ones((1, width), "<f4").tobytes()
    stream = names.input_stream(MODEL)
    before = stream_head(workers.r, stream)
    counted = invalid_count(http)
    cases: list[tuple[str, str, dict, int, str]] = [
        ("POST", INFER, {"json": body("INT32")}, 422, "datatype 'INT32'"),
        ("POST", INFER, {"json": body(data=row[:-1])}, 422, f"{width - 1} values for shape"),
        ("POST", INFER, {"json": body(shape=[2, width])}, 422, f"{width} values for shape"),
        ("POST", INFER, {"json": body(name="inputs")}, 422, "unknown input 'inputs'"),
        ("POST", INFER, {"json": body(data=[1e39, *row[1:]])}, 422,
         "inputs[0].data[0][0]: row 0, 'mean radius': not a finite"),
        ("POST", INFER, {"json": {**body(), "id": "x" * 200}}, 422, "id must be"),
        ("POST", INFER, {"content": head + blob,
                         "headers": {"Inference-Header-Content-Length": "12x"}}, 422,
         "Inference-Header-Content-Length must be a whole number"),
        ("POST", INFER, {"content": head + blob,
                         "headers": {"Inference-Header-Content-Length": str(len(head) - 3)}},
         422, f"in the body's first {len(head) - 3} bytes"),
        # found by a helper's probe, each a 500: a superscript two passed isdigit() and failed
        # int(); numpy refused to shape an empty tensor of a vast shape
        ("POST", INFER, {"content": head + blob,
                         "headers": {"Inference-Header-Content-Length": b"\xb2"}}, 422,
         "Inference-Header-Content-Length must be a whole number"),
        ("POST", INFER, {"json": body(shape=[0, 10**30], data=[])}, 422,
         "multiply past"),
        # two that differ are refused, naming both (the first was taken)
        ("POST", INFER, {"content": head + blob,
                         "headers": [("Inference-Header-Content-Length", str(len(head))),
                                     ("Inference-Header-Content-Length", "7")]}, 422,
         f"got '{len(head)}, 7'"),
        ("POST", INFER, {"json": body(data=[*row[:-1], "x"])}, 422,
         f"inputs[0].data[{width - 1}]: data must hold numbers only; this is a string"),
        ("POST", INFER, {"content": head + blob[:-4],
                         "headers": {"Inference-Header-Content-Length": str(len(head))}}, 422,
         "binary part"),
        ("POST", INFER, {"content": head + blob}, 422,
         "needs the Inference-Header-Content-Length header"),
        ("POST", INFER, {"content": zlib.compress(json.dumps(body()).encode()),
                         "headers": {"Content-Encoding": "deflate"}}, 415, "uncompressed"),
        ("POST", INFER, {"content": b"{" + b" " * (1024 * 1024 + 10) + b"}"}, 413,
         "larger than"),
        ("POST", INFER, {"content": iter([b"{", b" " * (1024 * 1024 + 10), b"}"])}, 413,
         "larger than"),
        ("POST", "/v2/models/nope/infer", {"json": body()}, 404, "'nope' does not exist"),
        ("POST", f"/v2/models/{MODEL}/versions/9/infer", {"json": body()}, 404,
         "no version '9'"),
        ("POST", f"/v2/models/{MODEL}/versions/9/infer", {"json": body("INT32")}, 404,
         "no version '9'"),
        ("GET", "/v2/models/nope", {}, 404, "'nope' does not exist"),
        ("GET", f"/v2/models/{MODEL}/versions/9", {}, 404, "no version '9'"),
        ("GET", "/v2/models/nope/ready", {}, 404, "'nope' does not exist"),
        ("GET", f"/v2/models/{MODEL}/versions/9/ready", {}, 404, "no version '9'"),
        ("GET", "/v2/no/such/route", {}, 404, "Not Found"),  # the framework's refusals too
        ("DELETE", INFER, {}, 405, "Method Not Allowed"),
    ]  # fmt: skip
    for method, path, kwargs, status, says in cases:
        resp = http.request(method, path, **kwargs)
        assert resp.status_code == status, (path, says, resp.status_code, resp.text)
        doc = resp.json()
        assert list(doc) == ["error"] and says in doc["error"], (path, says, doc)
    assert stream_head(workers.r, stream) == before, "a refused request reached the input stream"
    assert "Traceback" not in workers.procs["gateway"].log_text()
    # every refused infer of the model is counted as a refused predict is, the body cap's 413s
    # and the 415 too (found by hand: they were not)
    refused = sum(m == "POST" and p.startswith(f"/v2/models/{MODEL}/") for m, p, *_ in cases)
    wait_until(
        lambda: invalid_count(http) == counted + refused or None,
        5,
        f"{refused} more invalid requests",
    )
    # and the same body, right, is taken
    ok = http.post(INFER, content=head + blob,
                   headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert stream_head(workers.r, stream) not in (before, None)


def test_tritonclient_sees_the_errors(
    workers: System, client: triton.InferenceServerClient
) -> None:
    x = demo_data().x_test[:1].astype(np.float32)
    with pytest.raises(InferenceServerException, match="no version '7'") as caught:
        client.infer(MODEL, [_infer_input(x, True)], model_version="7")
    assert caught.value.status() == "404"
    bad = triton.InferInput("input", [1, x.shape[1] - 1], "FP32")
    bad.set_data_from_numpy(x[:, :-1])
    with pytest.raises(InferenceServerException, match=r"shape \[1, 29\]") as caught:
        client.infer(MODEL, [bad])
    assert caught.value.status() == "422"
    with pytest.raises(InferenceServerException, match="does not exist"):
        client.get_model_metadata("nope")
    assert [e["state"] for e in client.get_model_repository_index()] == ["READY", "READY"]
    for bad_index, why in ((b"[]", "a JSON object"), (b'{"ready": "yes"}', "ready: "),
                           (b"{", "not JSON"), (b"\xff", "not UTF-8"),
                           (b"\xef\xbb\xbf{}", "byte order mark"),
                           ("{}".encode("utf-16"), "not UTF-8")):  # fmt: skip
        refused = workers.http.post("/v2/repository/index", content=bad_index)
        assert refused.status_code == 400 and why in refused.json()["error"], refused.text
    gzipped = workers.http.post("/v2/repository/index", content=b"{}",
                                headers={"content-encoding": "gzip"})  # fmt: skip
    assert gzipped.status_code == 415 and "gzip" in gzipped.json()["error"]  # it was ignored
    named = workers.http.post("/v2/repository/index", json={"repository_name": "other"})
    assert named.status_code == 404 and "no repository named 'other'" in named.json()["error"]
    for change in (client.load_model, client.unload_model):  # the admin API's to do
        with pytest.raises(InferenceServerException, match="admin API") as caught:
            change(MODEL)
        assert caught.value.status() == "400"
    for stats in ({}, {"model_name": MODEL}, {"model_name": MODEL, "model_version": "2"}):
        with pytest.raises(InferenceServerException, match="rdv_requests_total") as caught:
            client.get_inference_statistics(**stats)  # it read as an unknown model
        assert caught.value.status() == "404"
    assert httpx.get(f"http://127.0.0.1:{workers.port}/v2/health/live").json() == {"live": True}
