"""Ground truth end to end: ``rdv serve`` (gateway, a worker per role, log bin) as a real
process on a real Redis (single node and cluster), real ONNX models; predictions, then labels
through ``POST /v1/deployments/{d}/feedback``, some after the decisions stream was trimmed;
the live accuracy in the drift report and on ``/metrics`` against scikit-learn's computation of
the same outputs and labels; bad input; the labelled promotion gate."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from admin_support import AUTH, TOKEN, copy_demo_models, features_body, upload_body
from sklearn import metrics

from gateway.cli.main import main
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, demo_data
from processes import PREDICT, RdvProcess, flush, rdv_env, wait_until
from rdv_client import AsyncClient, Client, RdvError
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.bus.server import free_port
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.outcomes import decode_labelled
from rendezvous.request_ids import minted_ms, new_request_id
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=1000, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)
FEEDBACK = f"/v1/deployments/{DEMO_DEPLOYMENT}/feedback"
DRIFT = f"/v1/deployments/{DEMO_DEPLOYMENT}/drift"
DEP = f"/admin/deployments/{DEMO_DEPLOYMENT}"
MAX_ROWS = 400
MAX_BODY = 64 * 1024


@dataclass
class Served:
    proc: RdvProcess
    http: httpx.Client
    r: redis.Redis | redis.RedisCluster
    url: str
    records: dict[str, DecisionRecord]
    """Every decision record seen while it was still in the (trimmed) stream."""
    truth: dict[str, int]

    def send(self, prefix: str, n: int, batch: int = 50) -> list[str]:
        """``n`` predicts; their decision records captured batch by batch, before the small
        decisions stream drops them."""
        data = demo_data()
        ids: list[str] = []
        for start in range(0, n, batch):
            chunk = []
            for i in range(start, min(n, start + batch)):
                rid = f"{prefix}-{i}"
                row = i % len(data.x_test)
                resp = self.http.post(PREDICT, json=features_body(data.x_test[row]),
                                      headers={"X-Request-Id": rid})  # fmt: skip
                assert resp.status_code == 200, resp.text
                self.truth[rid] = int(data.y_test[row])
                chunk.append(rid)
            self._capture(set(chunk))
            ids += chunk
        return ids

    def _capture(self, ids: set[str]) -> None:
        def found() -> bool:
            entries = self.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
            self.records.update({d.request_id: d for d in decode_entries(entries)})
            return ids <= set(self.records)

        wait_until(found, 20, "decision records")

    def feedback(self, body: Any) -> httpx.Response:
        return self.http.post(FEEDBACK, json=body)

    def report(self, requests: int, labelled_since_ms: float) -> dict[str, Any]:
        def fresh() -> dict[str, Any] | None:
            current = self.http.get(DRIFT).json()["accuracy"]["current"]
            fresh = current and current["evaluated_at_ms"] > labelled_since_ms
            return current if fresh and current["requests"] == requests else None

        return wait_until(fresh, 5, "the live accuracy (within 5 s of a label)")  # type: ignore[no-any-return]


single_node_only = pytest.mark.usefixtures("skip_on_cluster")
"""Transport and gate logic, the same on either bus: run once, to keep the suite short (the
cluster's side of feedback is the outcome store's, tested on both in test_outcome_store)."""


@pytest.fixture(scope="module")
def served(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    r = connect(bus_url)
    flush(r)
    data = copy_demo_models(demo_data_dir, tmp_path_factory.mktemp("feedback-data"))
    DeploymentStore(r).create(demo_deployment(ModelRegistry(data / "models"), SCHEDULE))
    port = free_port()
    env = rdv_env(bus_url, data, port, RDV_ADMIN_TOKEN=TOKEN, RDV_DECISIONS_MAXLEN="100",
                  RDV_MAX_ROWS=str(MAX_ROWS), RDV_MAX_BODY_BYTES=str(MAX_BODY),
                  RDV_GATEWAY_PROCESSES="2", RDV_FEEDBACK_TOKEN=TOKEN)  # fmt: skip
    logs = tmp_path_factory.mktemp("feedback-logs")
    proc = RdvProcess(["serve", "--data-dir", str(data)], env, logs / "serve.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=AUTH)
    try:
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve to be ready")
        yield Served(proc, http, r, f"http://127.0.0.1:{port}", {}, {})
    finally:
        http.close()
        code = proc.stop(timeout_s=40)
        r.close()
    assert code == 0, proc.log_text()[-3000:]


def _expected(served: Served, labels: dict[str, int], role: str) -> dict[str, float]:
    """scikit-learn's figures for ``role`` on the captured outputs and ``labels``."""
    y, pred, proba = [], [], []
    for rid, label in labels.items():
        out = served.records[rid].outputs[role]
        y.append(label)
        pred.append(out.labels[0])  # type: ignore[index]
        proba.append(out.probabilities[0])  # type: ignore[index]
    p = np.asarray(proba)
    p = p / p.sum(axis=1, keepdims=True)  # six decimals each: sums off by 1e-6 at most
    return {
        "accuracy": metrics.accuracy_score(y, pred),
        "log_loss": metrics.log_loss(y, p.astype(np.float32), labels=[0, 1]),  # as kept
        "brier": metrics.brier_score_loss(y, p[:, 1]),
        "recall_1": metrics.recall_score(y, pred, pos_label=1),
    }


def _check(report: dict[str, Any], served: Served, labels: dict[str, int]) -> None:
    by_role = {m["role"]: m for m in report["models"] if m["current"]}
    assert set(by_role) == {"real", "canary"}
    for role, fig in by_role.items():
        want = _expected(served, labels, role)
        assert fig["labelled"] == len(labels)
        assert fig["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
        assert fig["log_loss"] == pytest.approx(want["log_loss"], rel=1e-5)
        assert fig["brier"] == pytest.approx(want["brier"], rel=1e-5)
        assert fig["recall"]["1"] == pytest.approx(want["recall_1"], abs=1e-12)


def test_live_accuracy_equals_sklearn_on_the_same_outputs_also_after_the_trim(
    served: Served,
) -> None:
    ids = served.send("acc", 300)
    kept = {d.request_id for d in decode_entries(
        served.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT)))}  # fmt: skip
    trimmed = [rid for rid in ids if rid not in kept]
    assert len(trimmed) >= 100, "the decisions stream should have dropped the first requests"

    labels = {rid: served.truth[rid] for rid in ids}
    since = time.time() * 1000
    resp = served.feedback([{"request_id": rid, "label": y} for rid, y in labels.items()])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"accepted": 300, "relabelled": 0}
    report = served.report(300, since)
    _check(report, served, labels)
    assert report["paired"][0]["role"] == "canary" and report["paired"][0]["rows"] == 300

    # a relabel replaces the first label: the figures follow, the count does not grow
    flipped = {rid: 1 - labels[rid] for rid in ids[:40]}
    since = time.time() * 1000
    resp = served.feedback([{"request_id": rid, "label": y} for rid, y in flipped.items()])
    assert resp.json() == {"accepted": 40, "relabelled": 40}
    labels.update(flipped)
    report = served.report(300, since)
    _check(report, served, labels)

    scrape = served.http.get("/metrics").text
    real = next(m for m in report["models"] if m["role"] == "real" and m["current"])
    pattern = r'rdv_live_accuracy\{deployment="breast-cancer",role="real"\} (\S+)'
    found = re.search(pattern, scrape)
    assert found is not None, scrape[-2000:]
    assert float(found.group(1)) == pytest.approx(real["accuracy"])
    assert 'rdv_live_labelled{deployment="breast-cancer",role="canary"} 300.0' in scrape
    history = served.http.get(DRIFT).json()["accuracy"]["history"]
    assert history and history[-1]["roles"]["real"]["accuracy"] == pytest.approx(real["accuracy"])


def test_a_label_sent_right_after_the_prediction_is_accepted(served: Served) -> None:
    data = demo_data()
    for i in range(3):
        rid = f"quick-{i}"
        resp = served.http.post(PREDICT, json=features_body(data.x_test[i]),
                                headers={"X-Request-Id": rid})  # fmt: skip
        assert resp.status_code == 200
        answer = served.feedback({"request_id": rid, "correct": True, "weight": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["accepted"] == 1
    rows = [list(map(float, data.x_test[i])) for i in (0, 1)]
    resp = served.http.post(PREDICT, json={"instances": rows}, headers={"X-Request-Id": "two"})
    assert resp.status_code == 200
    labels = [int(y) for y in data.y_test[:2]]
    answer = served.feedback({"request_id": "two", "label": labels})
    assert answer.status_code == 200, answer.text

    # by the classes' names (the model's class_names): a model trained on strings is uploaded
    # with integer classes and their names, and its labels came back 422 (a helper's probe)
    by_name = served.feedback([{"request_id": "two", "label": ["benign", 0]},
                               {"request_id": "quick-0", "label": "malignant"}])  # fmt: skip
    assert by_name.status_code == 200 and by_name.json()["relabelled"] == 2, by_name.text
    stored = {
        e.request_id: e.label.labels
        for e in decode_labelled(served.r.xrange(names.labelled_stream(DEMO_DEPLOYMENT)))
    }
    assert stored["two"] == (1, 0) and stored["quick-0"] == (0,)  # fmt: skip
    unknown = served.feedback({"request_id": "two", "label": ["benign", "tumour"]})
    assert unknown.status_code == 422 and "'tumour' is not a class name" in unknown.text
    assert "malignant" in unknown.text


def test_only_an_id_that_may_be_on_its_way_is_waited_for(served: Served) -> None:
    """A miss is looked up again only while it may name a request answered a moment ago: an
    id the gateway made up within the wait, or a caller's own id still held. Any other is
    refused at once, not after the deployment's timeout and grace."""
    made_up = served.http.post(PREDICT, json=features_body(demo_data().x_test[0]))
    assert made_up.status_code == 200, made_up.text
    minted = made_up.json()["request_id"]
    assert abs(minted_ms(minted) - time.time() * 1000) < 5000, minted  # type: ignore[operator]
    accepted = served.feedback({"request_id": minted, "correct": True})
    assert accepted.status_code == 200, accepted.text

    def timed(rid: str) -> tuple[int, float]:
        started = time.monotonic()
        status = served.feedback({"request_id": rid, "label": 1}).status_code
        return status, time.monotonic() - started

    held = "held-but-unanswered"
    (key,) = names.request_id_keys(DEMO_DEPLOYMENT, held, [1])
    served.r.set(key, b"1", ex=60)
    hour_ago = new_request_id(int(time.time() * 1000) - 3_600_000)
    with ThreadPoolExecutor(4) as pool:
        at_once = list(pool.map(timed, ["never-predicted-at-all", hour_ago]))
        waited = list(pool.map(timed, [held, new_request_id()]))
    wait_s = (SCHEDULE.timeout_ms + SCHEDULE.grace_ms) / 1000
    assert all(status == 404 and took < 1.0 for status, took in at_once), at_once
    assert all(status == 404 and took >= wait_s for status, took in waited), waited


@single_node_only
def test_bad_feedback_is_refused_and_stores_nothing(served: Served) -> None:
    known = served.send("bad", 2)
    stream = names.labelled_stream(DEMO_DEPLOYMENT)
    before = served.r.xlen(stream)

    with ThreadPoolExecutor(2) as pool:  # each waits out the deployment's timeout: together
        waiting = [pool.submit(served.feedback, body) for body in (
            {"request_id": "never-predicted", "label": 1},
            [{"request_id": known[0], "label": 1}, {"request_id": "nope-1", "label": 0}],
        )]  # fmt: skip
        unknown, mixed = (w.result() for w in waiting)
    assert unknown.status_code == 404, unknown.text
    assert "never-predicted" in unknown.json()["detail"]
    # a 504 with no output read as "unknown or expired" alone (a helper's probe)
    assert "a 504 or 502 with no output at all" in unknown.json()["detail"]
    assert mixed.status_code == 404 and mixed.json()["unknown"] == ["nope-1"]

    not_a_class = served.feedback({"request_id": known[0], "label": 7})
    assert not_a_class.status_code == 422 and "not a class" in not_a_class.text
    rows = served.feedback({"request_id": known[0], "label": [0, 1]})
    assert rows.status_code == 422 and "1 rows" in rows.text
    for body, status, says in (
        ({"request_id": known[0]}, 422, "exactly one"),
        ({"request_id": known[0], "label": 1, "correct": True}, 422, "exactly one"),
        ({"request_id": known[0], "label": "1"}, 422, "label"),
        ({"request_id": known[0], "label": 1, "weight": -1}, 422, "weight"),
        ({"request_id": known[0], "label": 1, "weight": 1e308}, 422, "weight"),  # sums overflow
        ({"request_id": known[0], "label": 1, "weight": "2"}, 422, "weight"),
        ({"request_id": known[0], "label": 1, "weight": True}, 422, "weight"),
        ({"label": 1}, 422, "request_id"),
        ({"request_id": known[0], "label": 1, "extra": 1}, 422, "extra"),
        ([], 422, "empty"),
        ([1, 2], 422, "object"),
        # each was four to six faults, one per union branch, with "input": null (a probe)
        ({"request_id": known[0], "label": [[0, 1]]}, 422, "label [[0, 1]] is not a class"),
        ({"request_id": known[0], "label": 1.0}, 422, "label 1.0 is not a class"),
    ):
        resp = served.feedback(body)
        assert resp.status_code == status, (body, resp.text)
        assert says in resp.text, (body, resp.text)
        if "is not a class" in says:
            assert len(resp.json()["detail"]) == 1, resp.text
    garbage = served.http.post(FEEDBACK, content=b"{not json",
                               headers={"content-type": "application/json"})  # fmt: skip
    assert garbage.status_code == 400 and "not JSON" in garbage.text
    for raw in (b"[" * 30_000 + b"]" * 30_000, b'{"request_id": "\xff"}'):
        deep = served.http.post(FEEDBACK, content=raw, headers={"content-type": "application/json"})
        assert deep.status_code == 400, deep.text
    # named, as predict names them (they read "expected value at line 1 column 1")
    for raw, says in ((b'\xef\xbb\xbf{"label": 1}', "byte order mark"),
                      ('{"label": 1}'.encode("utf-16"), "not UTF-8")):  # fmt: skip
        named = served.http.post(
            FEEDBACK, content=raw, headers={"content-type": "application/json"}
        )
        assert named.status_code == 400 and says in named.text, named.text
    zipped = served.http.post(FEEDBACK, content=b"\x1f\x8b", headers={"content-encoding": "gzip"})
    assert zipped.status_code == 415 and "Content-Encoding 'gzip'" in zipped.text, zipped.text

    flood = [{"request_id": known[0], "label": 1}] * (MAX_ROWS + 1)
    assert served.feedback(flood).status_code == 413
    big = served.http.post(FEEDBACK, content=b"[" + b" " * MAX_BODY + b"]",
                           headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413
    assert (
        served.http.post(
            "/v1/deployments/no-such/feedback", json={"request_id": "x", "label": 1}
        ).status_code
        == 404
    )

    assert served.r.xlen(stream) == before, "a refused call stored something"
    bucket_keys = [names.labels_key(DEMO_DEPLOYMENT, int(time.time() // 3600) - k)
                   for k in range(2)]  # fmt: skip
    assert not any(served.r.hget(k, known[0]) for k in bucket_keys)


@single_node_only
def test_the_feedback_token_is_asked_for_when_set(served: Served) -> None:
    """Feedback needs no admin token, so anyone who knew or guessed a request id could label
    it, and one label of weight 1e6 took the live accuracy from 0.975 to 0.0002 (found by
    hand): RDV_FEEDBACK_TOKEN, set here, closes the route to callers without it."""
    [rid] = served.send("token", 1)
    body = {"request_id": rid, "label": served.truth[rid]}
    with httpx.Client(base_url=served.url) as anonymous:
        assert anonymous.post(FEEDBACK, json=body).status_code == 401
        wrong = anonymous.post(FEEDBACK, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        # two headers, the right one among them: which one counts would be a guess
        two = [("Authorization", "Bearer nope"), *AUTH.items()]
        doubled = anonymous.post(FEEDBACK, json=body, headers=two)
        assert doubled.status_code == 400, doubled.text
        assert "one Authorization header" in doubled.json()["detail"]
        right = anonymous.post(FEEDBACK, json=body, headers=AUTH)
        assert right.status_code == 200 and right.json()["accepted"] == 1


def test_one_request_labelled_again_and_again_keeps_one_entry(served: Served) -> None:
    """Every item added an entry to the labelled stream, which the live accuracy and the gate
    read only the latest of: one caller repeating its own id a thousand times pushed every
    other label out (live accuracy from 200 labels to 1; found by hand). A relabel now
    replaces its entry, and ``relabelled`` counts repeats within a call too."""
    honest = served.send("honest", 30)
    stream = names.labelled_stream(DEMO_DEPLOYMENT)
    before = served.r.xlen(stream)
    answer = served.feedback([{"request_id": rid, "label": served.truth[rid]} for rid in honest])
    assert answer.status_code == 200, answer.text
    [flood] = served.send("flood", 1)
    wrong = 1 - served.truth[flood]
    for expected in (299, 300):  # a first call repeats it 299 times; a second, 300 more
        answer = served.feedback([{"request_id": flood, "label": wrong}] * 300)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"accepted": 300, "relabelled": expected}
    assert served.r.xlen(stream) == before + 31
    latest = [fields[b"r"].decode() for _id, fields in served.r.xrevrange(stream, count=31)]
    assert sorted(latest) == sorted([*honest, flood])


def test_a_stored_figure_that_is_not_finite_is_served_as_null(served: Served) -> None:
    """A history point written before weights were bounded (a weight of 1e308 gave NaN) must
    not make the drift report fail: it is strict JSON."""
    history = names.accuracy_history_stream(DEMO_DEPLOYMENT)
    stamp = int(time.time() * 1000)
    point = {"ts_ms": stamp, "roles": {"real": {
        "model": "breast-cancer:2", "accuracy": math.nan, "labelled": math.inf}}}  # fmt: skip
    added = served.r.xadd(history, {b"p": json.dumps(point)})
    try:
        resp = served.http.get(DRIFT)
        assert resp.status_code == 200, resp.text
        # found by its time: the live accuracy may add a point of its own after it (labels of
        # the tests before are still being judged)
        [shown] = [p for p in resp.json()["accuracy"]["history"] if p["ts_ms"] == stamp]
        assert shown["roles"]["real"] == {"model": "breast-cancer:2", "accuracy": None,
                                          "labelled": None}  # fmt: skip
    finally:
        served.r.xdel(history, added)


@single_node_only
def test_the_cli_and_the_client_send_feedback(
    served: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = served.send("cli", 5)
    monkeypatch.setenv("RDV_FEEDBACK_TOKEN", TOKEN)  # what rdv feedback sends
    csv_file = tmp_path / "labels.csv"
    lines = ["request_id,label,weight", *(f"{rid},{served.truth[rid]},1.5" for rid in ids[:4])]
    csv_file.write_text("\ufeff" + "\n".join(lines) + "\n")  # a BOM, as Excel saves UTF-8
    main(["feedback", "--url", served.url, "--deployment", DEMO_DEPLOYMENT, "--batch", "3",
          str(csv_file)])  # fmt: skip
    out = capsys.readouterr()
    assert json.loads(out.out)["accepted"] == 4 and json.loads(out.out)["batches"] == 2
    assert "4/4 (100%)" in out.err

    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(json.dumps({"request_id": ids[4], "correct": False}) + "\n"
                     + json.dumps({"request_id": "cli-unknown", "label": 1}) + "\n")  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main(["feedback", "--url", served.url, "--deployment", DEMO_DEPLOYMENT, str(jsonl)])
    assert "refused: 404" in str(refused.value.code)

    with Client(served.url) as anonymous, pytest.raises(RdvError) as refused:
        anonymous.feedback(DEMO_DEPLOYMENT, request_id=ids[0], label=1)
    assert refused.value.status == 401
    with Client(served.url, feedback_token=TOKEN) as client:
        assert client.feedback(DEMO_DEPLOYMENT, request_id=ids[0], label=1) == {
            "accepted": 1, "relabelled": 1}  # fmt: skip
        with pytest.raises(RdvError) as unknown:
            client.feedback(DEMO_DEPLOYMENT, [{"request_id": "cli-nope", "label": 0}])
        assert unknown.value.status == 404

    async def send_async() -> Any:
        async with AsyncClient(served.url, feedback_token=TOKEN) as client:
            return await client.feedback(DEMO_DEPLOYMENT, [{"request_id": ids[4], "label": 0}])

    assert asyncio.run(send_async()) == {"accepted": 1, "relabelled": 0}


@single_node_only
def test_the_gate_weighs_a_challenger_on_labelled_requests(served: Served) -> None:
    http = served.http
    versions = {}
    for kind in ("weak", "flipped"):
        resp = http.post("/admin/models", json=upload_body(kind))
        assert resp.status_code == 201, resp.text
        versions[kind] = resp.json()["version"]
    for role, kind in (("cand", "weak"), ("bad", "flipped")):
        resp = http.post(f"{DEP}/challengers", json={"role": role, "version": versions[kind]})
        assert resp.status_code == 201, resp.text

    def live() -> bool:
        members = served.r.zrangebyscore(names.workers_key(DEMO_DEPLOYMENT), time.time() - 1.5,
                                         "+inf")  # fmt: skip
        roles = {m.decode().split("|")[0] for m in members}
        return {"cand", "bad"} <= roles

    wait_until(live, 30, "challenger workers")
    ids = served.send("gate", 230)
    ids = [rid for rid in ids if {"cand", "bad"} <= set(served.records[rid].outputs)]
    assert len(ids) >= 200
    truth = [{"request_id": rid, "label": served.truth[rid]} for rid in ids]
    assert served.feedback(truth).status_code == 200
    gate = {"min_labeled": 150, "min_accuracy_gain": 0.0, "significance": 0.05}

    worse = http.post(f"{DEP}/promote", json={"version": versions["flipped"], **gate})
    assert worse.status_code == 409, worse.text
    figures = worse.json()["gate"]["labelled"]
    assert figures["rows"] == len(ids) and figures["gain"] < 0
    assert figures["baseline_only_right"] > figures["candidate_only_right"]
    assert "McNemar p=" in worse.json()["detail"]

    # labels shaped so that the weak model is right on every request: real is wrong wherever
    # the two disagree, enough times for McNemar's test
    shaped = [{"request_id": rid, "label": served.records[rid].outputs["cand"].labels[0]}  # type: ignore[index]
              for rid in ids]  # fmt: skip
    real_wrong = sum(1 for rid in ids if served.records[rid].outputs["real"].labels
                     != served.records[rid].outputs["cand"].labels)  # fmt: skip
    assert real_wrong >= 6, "the demo models should disagree on a few rows"
    few = shaped[: len(ids) // 2]
    unsure = {"min_labeled": 50, "significance": 1e-9}  # the gain's bound left to its default
    assert served.feedback(few).status_code == 200
    not_sure = http.post(f"{DEP}/promote", json={"version": versions["weak"], **unsure})
    assert not_sure.status_code == 409, not_sure.text
    assert "not significantly better" in not_sure.json()["detail"]
    assert not_sure.json()["gate"]["min_accuracy_gain"] == 0.0  # the bound applied (was null)

    assert served.feedback(shaped).status_code == 200
    accepted = http.post(f"{DEP}/promote", json={"version": versions["weak"], **gate})
    assert accepted.status_code == 200, accepted.text
    figures = accepted.json()["detail"]["gate"]["labelled"]
    assert figures["candidate_accuracy"] == 1.0 and figures["baseline_only_right"] == 0
    assert figures["candidate_only_right"] == real_wrong and figures["p_value"] < 0.05

    promoted = f"{DEMO_MODEL}:{versions['weak']}"

    def real_now() -> bool:  # the live figures follow the promotion without a new label
        current = http.get(DRIFT).json()["accuracy"]["current"]
        return bool(current) and current["current"]["real"] == promoted

    wait_until(real_now, 5, "the live accuracy to follow the promotion")
    report = http.get(DRIFT).json()["accuracy"]["current"]
    real = next(m for m in report["models"] if m["current"] and m["role"] == "real")
    assert real["model"] == promoted and real["accuracy"] == 1.0

    history = http.get(f"{DEP}/history", params={"limit": 3}).json()["history"]
    assert [h["action"] for h in history] == ["promote-refused", "promote-refused", "promote"]
    refused = history[0]["detail"]["gate"]["labelled"]
    assert refused["rows"] == len(ids) and "p_value" in refused
    assert json.dumps(history)  # the figures are stored as plain JSON


def test_a_csv_labels_each_row_of_a_request_with_a_json_list(tmp_path: Path) -> None:
    from gateway.cli.feedback import read_items

    csv_file = tmp_path / "rows.csv"
    csv_file.write_text('request_id,label\nr-1,"[1,0,1]"\nr-2,0\nr-3,benign\nr-4,-1\n'
                        'r-5,"[1,""benign""]"\n')  # fmt: skip
    labels = [item["label"] for item in read_items(csv_file, "csv")]
    assert labels == [[1, 0, 1], 0, "benign", -1, [1, "benign"]]  # a class, or its name
    csv_file.write_text('request_id,label\nr-1,"[1,2.5]"\n')
    with pytest.raises(SystemExit) as bad:
        read_items(csv_file, "csv")
    assert "rows.csv:2" in str(bad.value.code) and "JSON list of classes" in str(bad.value.code)
