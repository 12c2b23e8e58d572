"""Helpers of the replay and export tests: ``rdv serve`` with traffic through it (archived,
decided, labelled through the feedback route), and the figures a replay must report, computed
directly with onnxruntime on the archived features."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from admin_support import AUTH, TOKEN, copy_demo_models, features_body, upload_body

from models.archive import ArchiveReader
from models.archive_slice import positions_from, read
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, demo_data
from processes import PREDICT, RdvProcess, flush, rdv_env, wait_until
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.bus.server import free_port
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.divergence import divergence
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=1000, timeout_ms=3000, fallbacks=("canary",), grace_ms=1000)
"""Generous: on a loaded machine every bin still answers within its deadline and the grace."""
REPLAYS = f"/admin/deployments/{DEMO_DEPLOYMENT}/replays"
K = 40
"""Single-row requests sent; two more carry three rows each."""
BATCH_ROWS = 4
TIMING = ("id", "timing", "latency")
"""The report's fields that depend on the clock (or name the run)."""


@dataclass
class Served:
    proc: RdvProcess
    http: httpx.Client
    r: redis.Redis
    url: str
    data: Path
    env: dict[str, str]
    weak: int
    ids: list[str]
    labels: dict[str, tuple[int, ...]]
    """The true class of each row, where a label was stored."""

    def replay(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(REPLAYS, json=body)
        assert resp.status_code == 202, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def finished(self, rid: str, timeout_s: float = 30) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            report = self.http.get(f"{REPLAYS}/{rid}").json()
            return report if report["state"] != "running" else None

        return wait_until(done, timeout_s, f"replay {rid}", 0.1)  # type: ignore[no-any-return]

    def rdv(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def serve_with_traffic(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: Any
) -> Iterator[Served]:
    r = connect(redis_url)
    flush(r)
    data = copy_demo_models(demo_data_dir, tmp_path_factory.mktemp("replay-data"))
    DeploymentStore(r).create(demo_deployment(ModelRegistry(data / "models"), SCHEDULE))
    port = free_port()
    env = rdv_env(
        redis_url,
        data,
        port,
        RDV_ADMIN_TOKEN=TOKEN,
        RDV_REPLAY_BATCH_ROWS=str(BATCH_ROWS),
        RDV_REPLAY_PAUSE_MS="200",
        RDV_LOGBIN_BATCH_WAIT_MS="5",
    )
    logs = tmp_path_factory.mktemp("replay-logs")
    proc = RdvProcess(["serve", "--data-dir", str(data)], env, logs / "serve.log")
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30, headers=AUTH)
    try:
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve to be ready")
        resp = http.post("/admin/models", json=upload_body("weak"))
        assert resp.status_code == 201, resp.text
        rows, truth = demo_data().x_test, demo_data().y_test
        ids, labels = [], {}
        for i in range(K):
            rid = f"rp-{i}"
            resp = http.post(PREDICT, json=features_body(rows[i]), headers={"X-Request-Id": rid})
            assert resp.status_code == 200, resp.text
            ids.append(rid)
            if i % 2 == 0:
                labels[rid] = (int(truth[i]),)
        for j in range(2):
            rid = f"rp-multi-{j}"
            body = {"instances": rows[K + 3 * j : K + 3 * j + 3].tolist()}
            resp = http.post(PREDICT, json=body, headers={"X-Request-Id": rid})
            assert resp.status_code == 200, resp.text
            ids.append(rid)
        # Labels as the feedback route keeps them: a hash per bucket, request id -> label.
        labels["rp-multi-0"] = tuple(int(y) for y in truth[K : K + 3])
        # Labels through the feedback route (it stores them; a judgement names no class).
        feedback = [{"request_id": rid, "label": list(v) if len(v) > 1 else v[0]}
                    for rid, v in labels.items()]  # fmt: skip
        feedback.append({"request_id": "rp-1", "correct": True})
        resp = http.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/feedback", json=feedback)
        assert resp.status_code == 200 and resp.json()["accepted"] == len(feedback), resp.text
        reader = ArchiveReader(data / "logbin")
        wait_until(lambda: len(list(reader.records(DEMO_DEPLOYMENT))) >= len(ids), 30, "archive")
        wait_until(lambda: set(ids) <= set(decisions_of(r)), 30, "decision records")
        time.sleep(1.1)  # older than an export's open --to margin (a test run alone met it)
        served = Served(proc, http, r, url, data, env, newest_version(http), ids, labels)
        yield served
        proc = served.proc  # a test may have restarted it
    finally:
        http.close()
        code = proc.stop(timeout_s=40)
        r.close()
    assert code == 0, proc.log_text()[-3000:]


def newest_version(http: httpx.Client) -> int:
    versions = http.get(f"/admin/models/{DEMO_MODEL}").json()["versions"]
    return max(v["version"] for v in versions)


def decisions_of(r: redis.Redis) -> dict[str, DecisionRecord]:
    entries = r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
    return {d.request_id: d for d in decode_entries(entries)}


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in TIMING}


def expected_report(served: Served, positions: dict[str, Any], version: int) -> dict[str, Any]:
    """The figures from onnxruntime run directly on the archived features (in the report's
    batches of BATCH_ROWS rows: a batch's width changes float32 bits in the last place), the
    decision records and the labels."""
    meta = ModelRegistry(served.data / "models").meta(DEMO_MODEL, version)
    model = OnnxClassifier(
        ModelRegistry(served.data / "models").artifact_path(DEMO_MODEL, version), meta
    )
    records = list(
        read(ArchiveReader(served.data / "logbin"), DEMO_DEPLOYMENT, positions_from(positions))
    )
    batches: list[list[dict[str, Any]]] = [[]]
    rows = 0
    for rec in records:
        batches[-1].append(rec)
        rows += len(rec["features"])
        if rows >= BATCH_ROWS:
            batches.append([])
            rows = 0
    decisions = decisions_of(served.r)
    digest = ""
    out: dict[str, Any] = {
        "records": 0,
        "rows": 0,
        "predicted": {},
        "given_rows": 0,
        "agreed": 0,
        "labeled": 0,
        "correct": 0,
        "hist": [0] * 10,
        "real_disagreements": 0,
        "matched": 0,
    }
    for batch in (b for b in batches if b):
        labels, proba = model.predict(
            np.concatenate([np.asarray(r["features"], np.float32) for r in batch])
        )
        at = 0
        for rec in batch:
            n = len(rec["features"])
            lab, pro = labels[at : at + n], proba[at : at + n]
            at += n
            rid = rec["request_id"]
            h = hashlib.sha256(digest.encode())
            h.update(rid.encode() + lab.astype("<i8").tobytes() + pro.astype("<f4").tobytes())
            digest = h.hexdigest()
            out["records"] += 1
            out["rows"] += n
            for v in lab.tolist():
                out["predicted"][str(v)] = out["predicted"].get(str(v), 0) + 1
            if rid in served.labels:
                out["labeled"] += n
                truth = served.labels[rid]
                out["correct"] += sum(a == b for a, b in zip(lab.tolist(), truth, strict=True))
            dec = decisions.get(rid)
            if dec is None:
                continue
            out["matched"] += 1
            chosen = dec.outputs.get(dec.chosen_role or "")
            if chosen is not None and chosen.labels is not None:
                out["given_rows"] += n
                out["agreed"] += sum(
                    a == b for a, b in zip(chosen.labels, lab.tolist(), strict=True)
                )
            real = dec.outputs.get("real")
            if real is not None and real.probabilities is not None:
                d = divergence(real.labels, np.asarray(real.probabilities), lab.tolist(), pro)
                out["real_disagreements"] += d.disagreements
                out["hist"][min(int(d.js_mean * 10), 9)] += 1
    out["digest"] = digest
    out["batches"] = sum(1 for b in batches if b)
    return out
