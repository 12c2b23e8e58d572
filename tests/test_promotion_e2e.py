"""Promotion end to end: ``rdv serve`` (gateway, a worker per role, log bin) as a real process
on a real Redis, real ONNX models, changes made through the admin API over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from admin_support import AUTH, TOKEN, copy_demo_models, features_body, upload_body

from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, Load, RdvProcess, flush, rdv_env, wait_until
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.bus.server import free_port
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=1000, timeout_ms=3000, fallbacks=("canary",), grace_ms=300)
"""A generous real deadline: under load on a small machine real still answers every request,
so each response's version says who held the real role."""
DEP = f"/admin/deployments/{DEMO_DEPLOYMENT}"


@dataclass
class Served:
    proc: RdvProcess
    http: httpx.Client
    r: redis.Redis
    url: str
    weak: int
    """Version of a regularised logistic regression: close to real."""
    flipped: int
    """Version trained on inverted labels: disagrees with real almost always."""

    def live(self, role: str) -> bool:
        members = self.r.zrangebyscore(
            names.workers_key(DEMO_DEPLOYMENT), time.time() - 1.5, "+inf"
        )
        return any(m.decode().startswith(f"{role}|") for m in members)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, f"{DEP}{path}", **kw)

    def send(self, prefix: str, n: int) -> dict[str, dict[str, Any]]:
        rows = demo_data().x_test
        out = {}
        for i in range(n):
            rid = f"{prefix}-{i}"
            resp = self.http.post(
                PREDICT, json=features_body(rows[i % len(rows)]), headers={"X-Request-Id": rid}
            )
            assert resp.status_code == 200, resp.text
            out[rid] = resp.json()
        return out

    def records(self, ids: set[str], timeout_s: float = 15) -> dict[str, DecisionRecord]:
        def found() -> dict[str, DecisionRecord] | None:
            entries = self.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
            recs = {d.request_id: d for d in decode_entries(entries)}
            return {i: recs[i] for i in ids} if ids <= set(recs) else None

        return wait_until(found, timeout_s, "decision records")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    redis_url = bus_url
    r = connect(redis_url)
    flush(r)
    data = copy_demo_models(demo_data_dir, tmp_path_factory.mktemp("serve-data"))
    DeploymentStore(r).create(demo_deployment(ModelRegistry(data / "models"), SCHEDULE))
    port = free_port()
    env = rdv_env(redis_url, data, port, RDV_ADMIN_TOKEN=TOKEN)
    logs = tmp_path_factory.mktemp("serve-logs")
    proc = RdvProcess(["serve", "--data-dir", str(data)], env, logs / "serve.log")
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30, headers=AUTH)
    try:
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve to be ready")
        versions = {}
        for kind in ("weak", "flipped"):
            resp = http.post("/admin/models", json=upload_body(kind))
            assert resp.status_code == 201, resp.text
            versions[kind] = resp.json()["version"]
        served = Served(proc, http, r, url, versions["weak"], versions["flipped"])
        wait_until(lambda: served.live("canary"), 30, "the canary worker")
        yield served
    finally:
        http.close()
        code = proc.stop(timeout_s=40)
        r.close()
    assert code == 0, proc.log_text()[-3000:]
    assert "admin API is on" in proc.log_text()
    assert TOKEN not in proc.log_text()


@pytest.fixture
def system(served: Served) -> Served:
    """Back to the first revision (real v2, canary v1, no challengers) through the API."""
    if served.admin("GET", "").json()["revision"] > 1:
        resp = served.admin("POST", "/rollback", json={"to_revision": 1, "reason": "test reset"})
        assert resp.status_code == 200, resp.text
    return served


def test_promote_then_rollback_under_load_drops_nothing(system: Served) -> None:
    bodies = [features_body(row) for row in demo_data().x_test[:20]]
    v_old, v_new = 2, system.weak

    def answered_by(version: int, after: float) -> int:
        return sum(
            1
            for rec in list(load.results)
            if rec["status"] == 200 and rec["model"]["version"] == version and rec["t"] > after
        )

    with Load(system.url, bodies, threads=2, max_requests=3000, max_s=60, prefix="swap") as load:
        wait_until(lambda: load.count(200) >= 100, 30, "the load to flow")
        a0 = time.monotonic()
        resp = system.admin("POST", "/promote", json={"version": v_new, "reason": "under load"})
        a1 = time.monotonic()
        assert resp.status_code == 200, resp.text
        wait_until(lambda: answered_by(v_new, a1) >= 100, 30, "the new version to answer")
        b0 = time.monotonic()
        resp = system.admin("POST", "/rollback", json={"reason": "and back"})
        b1 = time.monotonic()
        assert resp.status_code == 200, resp.text
        wait_until(lambda: answered_by(v_old, b1) >= 100, 30, "the old version to answer again")
    figures = load.figures()
    assert figures["sent"] == figures["answered_2xx"] >= 300, figures
    for rec in load.results:
        t0, t1 = rec["t"], rec["t"] + rec["ms"] / 1000
        held = set()
        if t0 < a1 or t1 > b0:
            held.add(v_old)
        if t1 > a0 and t0 < b1:
            held.add(v_new)
        assert rec["model"]["role"] == "real", rec
        assert rec["model"]["version"] in held, (rec, a0, a1, b0, b1)
    print(f"\n[promote under load] {figures}")


def test_after_a_promotion_the_old_real_is_the_canary_and_divergence_is_between_them(
    system: Served,
) -> None:
    resp = system.admin("POST", "/promote", json={"version": system.weak})
    assert resp.status_code == 200, resp.text
    answers = system.send("pair", 20)
    assert {(a["model"]["version"], a["model"]["role"]) for a in answers.values()} == {
        (system.weak, "real")
    }
    records = system.records(set(answers))
    abs_diff = 0.0
    for rec in records.values():
        assert rec.outputs["real"].version == system.weak
        assert rec.outputs["canary"].version == 2
        assert rec.pair("canary") == (f"breast-cancer:{system.weak}", "breast-cancer:2")
        assert rec.divergence is not None and rec.divergence is rec.divergences["canary"]
        abs_diff += rec.divergence.abs_diff_mean or 0.0
    assert abs_diff > 0


def test_a_challenger_added_at_runtime_scores_every_request_and_answers_none(
    system: Served,
) -> None:
    stream = names.input_stream(DEMO_DEPLOYMENT)
    last = system.r.xinfo_stream(stream)["last-generated-id"]
    resp = system.admin("POST", "/challengers", json={"role": "shadow", "version": system.flipped})
    assert resp.status_code == 201, resp.text
    groups = {g["name"].decode(): g for g in system.r.xinfo_groups(stream)}
    assert groups["model:shadow"]["last-delivered-id"] == last, "no replay of history"
    wait_until(lambda: system.live("shadow"), 30, "rdv serve to start the challenger's worker")

    answers = system.send("shadowed", 30)
    assert all(a["model"]["role"] == "real" for a in answers.values())
    records = system.records(set(answers))
    for rec in records.values():
        assert rec.outputs["shadow"].version == system.flipped
        assert rec.chosen_role == "real" and rec.missing == ()
        assert "shadow" in rec.divergences
    shadow = system.admin("GET", "/shadow").json()["roles"]["shadow"]
    assert shadow["scored"] >= 30 and shadow["answered"] == 0
    assert shadow["disagreement_rate"] > 0.5

    assert system.admin("DELETE", "/challengers/shadow").status_code == 200
    after = system.send("unshadowed", 5)
    for rec in system.records(set(after)).values():
        assert "shadow" not in rec.outputs and "shadow" not in rec.missing


def test_a_challenger_given_a_split_answers_its_seeded_share(system: Served) -> None:
    resp = system.admin(
        "POST", "/challengers", json={"role": "ab", "version": system.weak, "split": 0.3}
    )
    assert resp.status_code == 201, resp.text
    assert system.admin("PATCH", "/schedule", json={"split_seed": 42}).status_code == 200
    wait_until(lambda: system.live("ab"), 30, "rdv serve to start the challenger's worker")
    # A hosted role can be live within a second, before every gateway process's deployment
    # cache has followed the schedule (it does within a second): a record without its split
    # came from one that had not (a CI flake).
    time.sleep(1.2)

    answers = system.send("split", 80)
    expected = Schedule(splits=(("ab", 0.3),), split_seed=42)
    share = 0
    for rid, answer in answers.items():
        role = expected.for_request(rid).primary
        assert answer["model"]["role"] == role, (rid, answer)
        if role == "ab":
            share += 1
            assert answer["model"]["version"] == system.weak
    assert 0.15 <= share / len(answers) <= 0.45, share
    for rid, rec in system.records(set(answers)).items():
        assert rec.split is not None
        assert rec.split.assigned == expected.for_request(rid).primary
        assert rec.split.seed == 42
        assert rec.outcome == ("split" if rec.split.assigned == "ab" else "real")


def test_the_gate_refuses_short_or_divergent_evidence_and_accepts_enough(
    system: Served,
) -> None:
    for role, version in (("cand", system.weak), ("bad", system.flipped)):
        resp = system.admin("POST", "/challengers", json={"role": role, "version": version})
        assert resp.status_code == 201, resp.text
    gate = {"min_shadow_requests": 20, "max_disagreement": 0.2}
    early = system.admin("POST", "/promote", json={"version": system.weak, **gate})
    assert early.status_code == 409, early.text
    assert early.json()["gate"]["shadow"]["scored"] < 20

    wait_until(lambda: system.live("cand") and system.live("bad"), 30, "challenger workers")
    system.records(set(system.send("evidence", 25)))
    divergent = system.admin("POST", "/promote", json={"version": system.flipped, **gate})
    assert divergent.status_code == 409, divergent.text
    assert divergent.json()["gate"]["shadow"]["disagreement_rate"] > 0.2
    assert "disagrees with real" in divergent.json()["detail"]

    accepted = system.admin("POST", "/promote", json={"version": system.weak, **gate})
    assert accepted.status_code == 200, accepted.text
    figures = accepted.json()["detail"]["gate"]["shadow"]
    assert figures["scored"] >= 20 and figures["disagreement_rate"] <= 0.2
    assert figures["latency_p99_ms"] is not None

    history = system.admin("GET", "/history", params={"limit": 4}).json()["history"]
    assert [h["action"] for h in history[-3:]] == ["promote-refused", "promote-refused", "promote"]


def test_the_cli_drives_the_admin_api(
    system: Served,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import json

    from admin_support import variant_onnx

    from gateway.cli.main import main

    monkeypatch.setenv("RDV_ADMIN_TOKEN", TOKEN)
    model = tmp_path / "candidate.onnx"
    model.write_bytes(variant_onnx("weak"))
    main(
        [
            "models",
            "upload",
            "--url",
            system.url,
            "--file",
            str(model),
            "--name",
            "breast-cancer",
            "--deployment",
            DEMO_DEPLOYMENT,
            "--description",
            "from the cli",
        ]
    )
    uploaded = json.loads(capsys.readouterr().out)
    assert uploaded["description"] == "from the cli" and uploaded["version"] > system.flipped
    main(["models", "show", "--url", system.url, "--name", "breast-cancer"])  # every version
    versions = [v["version"] for v in json.loads(capsys.readouterr().out)["versions"]]
    assert uploaded["version"] in versions and len(versions) >= 3
    # a model of a feature set of its own: its names from a file (the CLI had no way to say)
    names = tmp_path / "features.txt"
    names.write_text("\n".join(f"scaled {n}" for n in demo_data().names))
    reference = tmp_path / "held-out.csv"
    header = ",".join(f'"scaled {n}"' for n in demo_data().names)
    lines = [",".join(map(repr, map(float, row))) for row in demo_data().x_test]
    reference.write_text("\n".join([header, *lines]) + "\n")
    main(["models", "upload", "--url", system.url, "--file", str(model), "--name", "rescaled",
          "--feature-names", f"@{names}", "--class-names", "malignant,benign",
          "--reference", str(reference)])  # fmt: skip
    other = json.loads(capsys.readouterr().out)
    assert other["name"] == "rescaled" and other["class_names"] == ["malignant", "benign"]
    main(["models", "show", "--url", system.url, "--name", "rescaled", "--version", "1"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["feature_spec"]["names"][0] == "scaled mean radius"
    assert shown["feature_spec"]["stats"]["scaled mean radius"]["mean"] == pytest.approx(
        float(demo_data().x_test[:, 0].mean()))  # fmt: skip
    assert len(shown["score_reference"]) == 10
    for missing in (
        ["models", "show"],
        ["models", "delete", "--name", "breast-cancer"],
        ["deployments", "history"],
        ["deployments", "create", "--deployment", "x"],
    ):
        with pytest.raises(SystemExit) as usage:  # said before any request names "None"
            main([*missing, "--url", "http://127.0.0.1:1"])
        assert usage.value.code == 2
        assert "required" in capsys.readouterr().err

    main(
        [
            "challengers",
            "add",
            "--url",
            system.url,
            "--deployment",
            DEMO_DEPLOYMENT,
            "--role",
            "cli",
            "--version",
            str(uploaded["version"]),
            "--reason",
            "cli test",
        ]
    )
    assert json.loads(capsys.readouterr().out)["deployment"]["challengers"] == ["cli"]
    with pytest.raises(SystemExit) as invalid:  # a 422's faults in words, not a Python list
        main(["challengers", "add", "--url", system.url, "--deployment", DEMO_DEPLOYMENT,
              "--role", "ab", "--version", str(uploaded["version"]), "--split", "1.5"])  # fmt: skip
    assert str(invalid.value.code).endswith(
        "-> 422: split: Input should be less than or equal to 1"
    ), invalid.value.code
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(
            [
                "promote",
                "--url",
                system.url,
                "--deployment",
                DEMO_DEPLOYMENT,
                "--version",
                str(uploaded["version"]),
                "--min-shadow-requests",
                "100000",
            ]
        )
    assert "409" in str(refused.value.code)
    with pytest.raises(SystemExit) as moved:  # another operator's change came first
        main(["promote", "--url", system.url, "--deployment", DEMO_DEPLOYMENT, "--version",
              str(uploaded["version"]), "--expect-revision", "1", "--force"])  # fmt: skip
    assert "409" in str(moved.value.code) and "not 1" in str(moved.value.code), moved.value.code
    for command in (["rollback"], ["challengers", "remove", "--role", "c9"],
                    ["schedule", "set", "--grace-ms", "90"], ["partitions", "2"]):  # fmt: skip
        with pytest.raises(SystemExit) as moved:  # every change takes it
            main([*command, "--url", system.url, "--deployment", DEMO_DEPLOYMENT,
                  "--expect-revision", "1"])  # fmt: skip
        assert "409" in str(moved.value.code) and "not 1" in str(moved.value.code), command
    main(
        [
            "deployments",
            "history",
            "--url",
            system.url,
            "--deployment",
            DEMO_DEPLOYMENT,
            "--limit",
            "2",
        ]
    )
    entries = json.loads(capsys.readouterr().out)["history"]
    assert [e["action"] for e in entries] == ["add-challenger", "promote-refused"]
    assert entries[0]["reason"] == "cli test" and "@" in entries[0]["actor"]
    main(["partitions", "--url", system.url, "--deployment", DEMO_DEPLOYMENT, "2"])
    assert json.loads(capsys.readouterr().out)["deployment"]["partitions"] == 2
    main(["deployments", "show", "--url", system.url, "--deployment", DEMO_DEPLOYMENT])
    shown = json.loads(capsys.readouterr().out)
    assert [p["published_to"] for p in shown["input"]] == [True, True]
    time.sleep(1.2)  # every gateway process's deployment cache follows within a second
    body = features_body(demo_data().x_test[0])
    answers = [system.http.post(PREDICT, json=body, headers={"X-Request-Id": f"part-{i}"})
               for i in range(20)]  # fmt: skip
    assert [a.status_code for a in answers] == [200] * 20  # on both partitions
