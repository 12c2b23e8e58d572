"""The whole data path with real processes: gateway, real and canary workers and the log bin
as ``rdv`` subprocesses, a real Redis server, the real demo ONNX models, real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from models.archive import ArchiveReader
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, RdvProcess, System, launch_system, stream_head, wait_until
from rendezvous import names
from rendezvous.bus.server import free_port
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.envelope import RequestEnvelope
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=50, timeout_ms=800, fallbacks=("canary",), grace_ms=100)


@pytest.fixture(scope="module")
def system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, SCHEDULE) as sys:
        yield sys


@pytest.fixture
def both_workers(system: System) -> Iterator[System]:
    system.start_worker("real")
    system.start_worker("canary")
    yield system
    for role in ("real", "canary"):
        if role in system.procs:
            system.stop(role)


def rows(n: int, offset: int = 0) -> np.ndarray:
    return demo_data().x_test[offset : offset + n]


def features_body(row: np.ndarray) -> dict:
    return {"features": dict(zip(demo_data().names, map(float, row), strict=True))}


def decisions_by_id(r: redis.Redis) -> dict[str, DecisionRecord]:
    entries = r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
    return {d.request_id: d for d in decode_entries(entries)}


def test_readiness_follows_the_real_worker(system: System) -> None:
    assert system.http.get("/readyz").status_code == 503
    system.start_worker("real")
    try:
        ready = wait_until(lambda: system.http.get("/readyz").status_code == 200, 10, "ready")
        assert ready
    finally:
        system.stop("real")


WITNESS_GROUP = "e2e-witness"


def test_predictions_travel_the_whole_path(both_workers: System, demo_data_dir: Path) -> None:
    system = both_workers
    x = rows(8)
    registry = ModelRegistry(demo_data_dir / "models")
    real = OnnxClassifier(
        registry.artifact_path("breast-cancer", 2), registry.meta("breast-cancer", 2)
    )
    canary = OnnxClassifier(
        registry.artifact_path("breast-cancer", 1), registry.meta("breast-cancer", 1)
    )
    want_labels, want_proba = real.predict(x)
    canary_labels, canary_proba = canary.predict(x)

    # A group of the test's own holds the input stream's floor: the log bin trims what every
    # group is done with, and the envelopes are read at the end.
    stream = names.input_stream(DEMO_DEPLOYMENT)
    system.r.xgroup_create(stream, WITNESS_GROUP, id="$", mkstream=True)
    try:
        _travel_the_whole_path(system, x, want_labels, want_proba, canary_labels, canary_proba)
    finally:
        system.r.xgroup_destroy(stream, WITNESS_GROUP)


def _travel_the_whole_path(
    system: System,
    x: np.ndarray,
    want_labels: np.ndarray,
    want_proba: np.ndarray,
    canary_labels: np.ndarray,
    canary_proba: np.ndarray,
) -> None:
    sent: dict[str, np.ndarray] = {}
    for i in range(6):
        rid = f"e2e-{i}"
        resp = system.predict(features_body(x[i]), **{"X-Request-Id": rid})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["request_id"] == rid
        assert body["model"] == {"name": "breast-cancer", "version": 2, "role": "real"}
        [pred] = body["predictions"]
        assert pred["label"] == int(want_labels[i])
        assert pred["probabilities"]["1"] == pytest.approx(float(want_proba[i, 1]), abs=1e-6)
        assert body["latency_ms"] > 0
        sent[rid] = x[i : i + 1]
    batch = system.predict({"instances": x[6:8].tolist()}, **{"X-Request-Id": "e2e-batch"})
    assert batch.status_code == 200, batch.text
    assert [p["label"] for p in batch.json()["predictions"]] == want_labels[6:8].tolist()
    sent["e2e-batch"] = x[6:8]

    def recorded() -> dict[str, DecisionRecord] | None:
        found = decisions_by_id(system.r)
        return found if set(sent) <= set(found) else None

    decisions = wait_until(recorded, 10, "decision records")
    for i in range(6):
        rec = decisions[f"e2e-{i}"]
        assert rec.outcome == "real" and rec.missing == ()
        real_out, canary_out = rec.outputs["real"], rec.outputs["canary"]
        assert real_out.version == 2 and canary_out.version == 1
        assert canary_out.labels == [int(canary_labels[i])]
        assert real_out.probabilities is not None and canary_out.probabilities is not None
        p_real = real_out.probabilities[0][1]
        p_canary = canary_out.probabilities[0][1]
        assert p_canary == pytest.approx(float(canary_proba[i, 1]), abs=1e-5)
        div = rec.divergence
        assert div is not None
        assert div.abs_diff_mean == pytest.approx(abs(p_real - p_canary), abs=1e-5)
        assert div.disagreements == int(want_labels[i] != canary_labels[i])
        assert 0 <= div.js_mean <= 1
    batch_div = decisions["e2e-batch"].divergence
    assert batch_div is not None and batch_div.rows == 2

    def archived() -> dict[str, dict] | None:
        recs = {
            r["request_id"]: r
            for r in ArchiveReader(system.data_dir / "logbin").records(DEMO_DEPLOYMENT)
        }
        return recs if set(sent) <= set(recs) else None

    archive = wait_until(archived, 10, "log bin archive")
    assert set(archive) == set(sent), "the archive holds exactly the requests sent"
    for rid, features in sent.items():
        np.testing.assert_array_equal(np.asarray(archive[rid]["features"], np.float32), features)
        assert archive[rid]["spec_version"].startswith("fs-")
    assert archive["e2e-0"]["raw"]["features"]["mean radius"] == pytest.approx(float(x[0, 0]))
    # the gateway parsed these bodies: their envelopes say so, and the log bin splices them
    inputs = system.r.xrange(names.input_stream(DEMO_DEPLOYMENT))
    envelopes = {e.request_id: e for e in (RequestEnvelope.decode(f) for _id, f in inputs)}
    assert all(envelopes[rid].raw_is_json for rid in sent)


def test_a_reply_stream_deleted_is_made_again_within_seconds(both_workers: System) -> None:
    """The workers append answers with NOMKSTREAM: a gateway whose reply stream was deleted
    (by hand, or evicted by a Redis whose policy evicts) lost every answer, 504s for up to a
    minute while /readyz said 200 (found by a helper's probe)."""
    system = both_workers
    assert system.predict(features_body(rows(1)[0])).status_code == 200
    streams = list(system.r.scan_iter(match="rdv:reply:*", _type="stream"))
    assert streams and system.r.delete(*streams)
    body = features_body(rows(1)[0])
    answered = wait_until(lambda: system.predict(body).status_code == 200 or None, 4, "a 200")
    assert answered


def test_canary_answers_when_real_is_down(system: System) -> None:
    system.start_worker("canary")
    try:
        t0 = time.perf_counter()
        resp = system.predict(features_body(rows(1)[0]))
        elapsed_ms = (time.perf_counter() - t0) * 1000
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == {"name": "breast-cancer", "version": 1, "role": "canary"}
        assert elapsed_ms >= SCHEDULE.real_deadline_ms
        assert body["latency_ms"] >= SCHEDULE.real_deadline_ms
        rec = wait_until(lambda: decisions_by_id(system.r).get(body["request_id"]), 5, "record")
        assert rec.outcome == "fallback" and rec.missing == ("real",)
    finally:
        system.stop("canary")


def test_no_worker_means_504_within_the_timeout(system: System) -> None:
    t0 = time.perf_counter()
    resp = system.predict(features_body(rows(1)[0]), **{"X-Request-Id": "nobody-home"})
    elapsed_ms = (time.perf_counter() - t0) * 1000
    assert resp.status_code == 504
    assert "no model answered" in resp.json()["detail"]
    assert resp.json()["request_id"] == "nobody-home"
    assert SCHEDULE.timeout_ms <= elapsed_ms < SCHEDULE.timeout_ms + 500


def test_a_request_id_is_refused_on_every_gateway_in_flight_and_after_its_answer(
    system: System,
) -> None:
    """Two gateway processes on one Redis (or cluster): a caller's request id taken by one is
    409 on the other while in flight, and on both after its answer (no worker: it times out)."""
    port = free_port()
    other = RdvProcess(["gateway"], {**system.env, "RDV_PORT": str(port)},
                       system.logs / "gateway-2.log")  # fmt: skip
    http2 = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_until(lambda: http2.get("/healthz").status_code == 200, 30, "second gateway")
        body = features_body(rows(1)[0])
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(system.predict, body, **{"X-Request-Id": "shared-id"})
            time.sleep(SCHEDULE.timeout_ms / 4000)  # in flight on the first gateway
            elsewhere = http2.post(PREDICT, json=body, headers={"X-Request-Id": "shared-id"})
            assert elsewhere.status_code == 409, elsewhere.text
            assert "shared-id" in elsewhere.json()["detail"]
            assert first.result().status_code == 504  # the first one was not disturbed
        for gateway in (system.http, http2):  # answered: still taken, on both
            again = gateway.post(PREDICT, json=body, headers={"X-Request-Id": "shared-id"})
            assert again.status_code == 409, again.text
        fresh = http2.post(PREDICT, json=body, headers={"X-Request-Id": "another-id"})
        assert fresh.status_code == 504  # a new id is published (and times out: no worker)
        assert system.r.exists(
            names.request_id_key(names.input_stream(DEMO_DEPLOYMENT), "another-id")
        )
    finally:
        http2.close()
        assert other.stop() in (0, -15), other.log_text()[-2000:]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"features": {"mean radius": 1.0}}, "missing feature 'mean texture'"),
        ({"instances": [[1.0, 2.0]]}, "row has 2 values"),
        ({"instances": [["a"] * 30]}, "valid number"),
        ({}, "exactly one"),
        ({"features": {**features_body(np.zeros(30))["features"], "bogus": 1}}, "unknown feature"),
    ],
)
def test_bad_input_is_422_naming_the_problem_and_publishes_nothing(
    system: System, body: dict, needle: str
) -> None:
    stream = names.input_stream(DEMO_DEPLOYMENT)
    before = stream_head(system.r, stream)
    resp = system.predict(body)
    assert resp.status_code == 422, resp.text
    assert needle in resp.text
    assert stream_head(system.r, stream) == before


def test_two_request_ids_are_refused_on_every_way_into_predict(system: System) -> None:
    """Predict took the last X-Request-Id, a job and an infer the first (found by a helper's
    fuzzing): which one named the request depended on the route. Nothing is published."""
    stream = names.input_stream(DEMO_DEPLOYMENT)
    before = stream_head(system.r, stream)
    row = demo_data().x_test[0].tolist()
    infer = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row}]}
    for path, body in ((PREDICT, {"instances": [row]}),
                       (f"/v1/deployments/{DEMO_DEPLOYMENT}/jobs", {"instances": [row]}),
                       (f"/v2/models/{DEMO_DEPLOYMENT}/infer", infer)):  # fmt: skip
        twice = [("X-Request-Id", "one"), ("X-Request-Id", "two")]
        resp = system.http.post(path, json=body, headers=twice)
        assert resp.status_code == 422 and "given 2 times" in resp.text, (path, resp.text)
    assert stream_head(system.r, stream) == before


def test_unknown_deployment_is_404(system: System) -> None:
    resp = system.http.post("/v1/deployments/nope/predict", json=features_body(np.zeros(30)))
    assert resp.status_code == 404 and "nope" in resp.json()["detail"]


def test_oversized_body_is_413_and_publishes_nothing(system: System) -> None:
    stream = names.input_stream(DEMO_DEPLOYMENT)
    before = stream_head(system.r, stream)
    big = {"instances": [[0.5] * 30] * 10000}  # about 1.5 MB of JSON, over the 1 MiB default
    resp = system.predict(big)
    assert resp.status_code == 413 and "larger than" in resp.json()["detail"]
    chunks = (
        b'{"instances": [' + b",".join([b"[" + b",".join([b"0.5"] * 30) + b"]"] * 10000) + b"]}",
    )
    streamed = system.http.post(
        PREDICT, content=iter(chunks), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert stream_head(system.r, stream) == before
