"""The typed client (rdv_client) against a real gateway, workers and Redis: the same answers
as onnxruntime, refusals as RdvError with their status and Retry-After, admin calls with the
token, and the async client saying the same as the sync one."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.archive import ArchiveReader
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, demo_data
from processes import System, launch_system, wait_until
from rdv_client import AsyncClient, Client, GatewayUnreachable, JobExists, Prediction, RdvError
from rendezvous.schedule import Schedule

SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)
TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE, own_models=True,
                       RDV_ADMIN_TOKEN=TOKEN) as sys:  # fmt: skip
        sys.start_worker("real")
        sys.start_worker("canary")
        yield sys


def test_predict_answers_what_onnxruntime_answers(system: System, demo_data_dir: Path) -> None:
    data = demo_data()
    x = data.x_test[:4]
    registry = ModelRegistry(demo_data_dir / "models")
    real = OnnxClassifier(registry.artifact_path("breast-cancer", 2),
                          registry.meta("breast-cancer", 2))  # fmt: skip
    labels, proba = real.predict(x)
    base = f"http://127.0.0.1:{system.port}"
    with Client(base) as rdv:
        one = rdv.predict(DEMO_DEPLOYMENT, features=dict(zip(data.names, map(float, x[0]),
                                                             strict=True)),
                          request_id="client-1")  # fmt: skip
        assert isinstance(one, Prediction) and one.request_id == "client-1"
        assert one.model.role == "real" and one.model.version == 2
        assert one.label == labels[0]
        many = rdv.predict(DEMO_DEPLOYMENT, instances=x.tolist())
        assert [r.label for r in many.rows] == list(labels)
        got = np.array([[r.probabilities[c] for c in sorted(r.probabilities)] for r in many.rows])
        assert np.allclose(got, proba, atol=1e-6)
        with pytest.raises(RdvError) as refused:
            rdv.predict(DEMO_DEPLOYMENT, instances=[[1.0, 2.0]])
        assert refused.value.status == 422 and "row has 2 values" in str(refused.value.detail)
        # the message in words, the detail as the gateway sent it (found by hand: the message
        # was the Python repr of the list of faults)
        assert (
            str(refused.value) == "422: instances[0]: row has 2 values, the deployment expects 30"
        )
        assert isinstance(refused.value.detail, list)
        with pytest.raises(RdvError) as unknown:
            rdv.predict("nope", instances=[[1.0]])
        assert unknown.value.status == 404
        with pytest.raises(RdvError) as again:
            rdv.predict(DEMO_DEPLOYMENT, instances=x[:1].tolist(), request_id="client-1")
        assert again.value.status == 409
        with pytest.raises(ValueError, match="exactly one"):
            rdv.predict(DEMO_DEPLOYMENT)


def test_admin_calls_need_the_token_and_return_the_gateways_json(system: System) -> None:
    base = f"http://127.0.0.1:{system.port}"
    with Client(base) as anonymous, pytest.raises(ValueError, match="admin_token"):
        anonymous.deployments()
    with Client(base, admin_token="wrong") as wrong:
        with pytest.raises(RdvError) as refused:
            wrong.deployments()
        assert refused.value.status == 403
    with Client(base, admin_token=TOKEN, actor="ana") as admin:
        listed = admin.deployments()
        assert [d["name"] for d in listed["deployments"]] == [DEMO_DEPLOYMENT]
        shown = admin.deployment(DEMO_DEPLOYMENT)
        assert shown["roles"]["real"]["version"] == 2 and shown["live_workers"]["real"] == 1
        changed = admin.set_schedule(DEMO_DEPLOYMENT, grace_ms=120, reason="client test")
        assert changed["deployment"]["schedule"]["grace_ms"] == 120
        last = admin.history(DEMO_DEPLOYMENT, limit=1)["history"][0]
        assert (last["action"], last["actor"]) == ("set-schedule", "ana")  # X-Actor
        real = shown["roles"]["real"]
        made = admin.create_deployment("second", real["name"], real["version"], reason="try")
        assert made["name"] == "second" and made["revision"] == 1
        gone = admin.delete_deployment("second", reason="done")
        assert gone["action"] == "delete" and gone["deployment"]["deleted_ms"] > 0
        assert [d["name"] for d in admin.deployments()["deployments"]] == [DEMO_DEPLOYMENT]
        with pytest.raises(RdvError) as deleted:
            admin.deployment("second")
        assert deleted.value.status == 404 and "was deleted" in str(deleted.value)


def test_the_async_client_says_the_same(system: System) -> None:
    x = demo_data().x_test[:2].tolist()
    base = f"http://127.0.0.1:{system.port}"

    async def main() -> tuple[list[object], object]:
        async with AsyncClient(base, admin_token=TOKEN) as rdv:
            answers = await asyncio.gather(*(rdv.predict(DEMO_DEPLOYMENT, instances=[row])
                                             for row in x))  # fmt: skip
            shown = await rdv.deployment(DEMO_DEPLOYMENT)
            return [a.label for a in answers], shown

    labels, shown = asyncio.run(main())
    with Client(base) as rdv:
        assert labels == [rdv.predict(DEMO_DEPLOYMENT, instances=[row]).label for row in x]
    assert isinstance(shown, dict) and shown["name"] == DEMO_DEPLOYMENT


def test_bodies_name_entities_for_a_deployment_that_looks_features_up() -> None:
    from rdv_client.calls import body_of as _body

    assert _body({"a": 1.0}, None, entity="c-17") == {"entity": "c-17", "features": {"a": 1.0}}
    assert _body(None, None, entity="c-17") == {"entity": "c-17"}  # every feature looked up
    assert _body(None, [[1, 2]], entities=["c-1"]) == {"entities": ["c-1"],
                                                      "instances": [[1.0, 2.0]]}  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        _body({"a": 1.0}, [[1.0]])


def test_bools_stay_bools_rows_come_in_every_shape_and_errors_cross_processes() -> None:
    """Found by a helper's probe: ``True`` went out as 1.0 (so ``correct=True``,
    ``force=True`` and ``pin_canary`` were refused 422), one row (a 1-D array) was a
    TypeError, a DataFrame's column names were read as its rows, and an ``RdvError`` broke a
    process pool (it could not be pickled)."""
    import pickle

    from rdv_client.calls import body_of as _body
    from rdv_client.calls import feedback_body as _feedback_body
    from rdv_client.calls import plain as _plain

    assert _plain({"force": True, "pin_canary": np.bool_(False), "version": np.int64(3)}) == {
        "force": True, "pin_canary": False, "version": 3}  # fmt: skip
    assert _plain(_feedback_body(None, "r-1", None, True, None)) == {
        "request_id": "r-1", "correct": True}  # fmt: skip
    assert _body({"a": True}, None)["features"] == {"a": True}  # the gateway names it
    row = np.array([1.5, 2.0], dtype=np.float32)
    for one in (row, [1.5, 2.0], np.array([row, row])[:1]):
        assert _body(None, one)["instances"] == [[1.5, 2.0]]

    class Frame:  # what the client reads of a pandas DataFrame
        columns = ("a", "b")

        def to_numpy(self) -> np.ndarray:
            return np.array([[1.0, 2.0], [3.0, 4.0]])

    assert _body(None, Frame())["instances"] == [[1.0, 2.0], [3.0, 4.0]]
    for error in (RdvError(429, "busy", 1.0, {"detail": "busy"}),
                  JobExists(409, "taken", {"id": "j-1", "location": "/x"})):  # fmt: skip
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert again.status == error.status and again.body == error.body
    assert (
        pickle.loads(pickle.dumps(JobExists(409, "t", {"id": "j", "location": "/l"}))).job_id == "j"
    )


def test_a_nan_or_an_infinity_is_refused_before_sending_naming_where() -> None:
    """httpx's encoder said only "Out of range float values are not JSON compliant"."""
    from rdv_client.calls import body_of as _body

    rows = np.ones((3, 4), dtype=np.float32)
    rows[2, 1] = np.nan
    for given, where in ((rows, r"instances\[2\]\[1\]: nan"),
                         ([1.0, float("inf")], r"instances\[1\]: inf"),
                         (rows[2], r"instances\[1\]: nan")):  # fmt: skip
        with pytest.raises(ValueError, match=where + " is not a finite number"):
            _body(None, given)
    with pytest.raises(ValueError, match=r"features\['b'\]: -inf is not a finite"):
        _body({"a": 1.0, "b": -np.inf}, None)
    with Client("http://127.0.0.1:9") as rdv, pytest.raises(ValueError, match="JSON has no NaN"):
        rdv.predict("d", instances=[[float("nan")]])  # nothing sent: port 9 is not listening


def test_jobs_through_the_client_end_like_predicts(system: System) -> None:
    x = demo_data().x_test[:3].tolist()
    with Client(f"http://127.0.0.1:{system.port}") as rdv:
        jobs = [rdv.submit(DEMO_DEPLOYMENT, instances=[row]) for row in x]
        assert all(j.status == "pending" and j.location for j in jobs)
        done = [rdv.result(DEMO_DEPLOYMENT, j.id, wait_ms=10_000) for j in jobs[:2]]
        done.append(rdv.wait(DEMO_DEPLOYMENT, jobs[2], timeout_s=10, poll_ms=50))
        assert [j.status for j in done] == ["done"] * 3
        direct = [rdv.predict(DEMO_DEPLOYMENT, instances=[row]).label for row in x]
        assert [j.result.label for j in done if j.result] == direct
        with pytest.raises(RdvError) as unknown:
            rdv.result(DEMO_DEPLOYMENT, "0-0")
        assert unknown.value.status in (404, 422)


def test_a_long_poll_stretches_the_timeout_by_its_wait(system: System) -> None:
    """A 15 s long poll through a client with the default 10 s timeout raised ReadTimeout at
    10 s (found by hand): the read timeout covers the wait the call asks the server for. Here
    a 0.5 s client waits out a job that no worker answers (they are paused) for 1 s or more."""
    workers = [system.procs[role].proc.pid for role in ("real", "canary")]
    body = {"instances": [demo_data().x_test[0].tolist()]}
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with Client(f"http://127.0.0.1:{system.port}", timeout=0.5) as client:
            job = client.submit(DEMO_DEPLOYMENT, **body)
            t0 = time.monotonic()
            client.result(DEMO_DEPLOYMENT, job.id, wait_ms=1000)
            assert time.monotonic() - t0 >= 0.9  # held by the server past the client's 0.5 s
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=f"job {job.id} still pending after 0.8 s"):
                client.wait(DEMO_DEPLOYMENT, job.id, timeout_s=0.8, poll_ms=300)
            assert 0.75 <= time.monotonic() - t0 < 3  # long polls, within the client's timeout

        async def poll() -> None:
            async with AsyncClient(f"http://127.0.0.1:{system.port}", timeout=0.5) as client:
                job = await client.submit(DEMO_DEPLOYMENT, **body)
                await client.result(DEMO_DEPLOYMENT, job.id, wait_ms=1000)
                with pytest.raises(TimeoutError):
                    await client.wait(DEMO_DEPLOYMENT, job, timeout_s=0.2)

        asyncio.run(poll())
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)


def test_jobs_carry_their_request_id_and_a_taken_one_names_the_first_job(system: System) -> None:
    """Found by hand: a submit's 409 kept only the detail, so a caller that lost the 202 could
    not find its job; ``Job`` had no request id; ``cancel`` answered an untyped dict; an empty
    request id was dropped by the client (the gateway makes one up for it, as for none)."""
    row = demo_data().x_test[0].tolist()
    rid = f"client-job-{time.time_ns()}"
    with Client(f"http://127.0.0.1:{system.port}") as rdv:
        first = rdv.submit(DEMO_DEPLOYMENT, instances=[row], request_id=rid)
        assert first.request_id == rid
        with pytest.raises(JobExists) as taken:
            rdv.submit(DEMO_DEPLOYMENT, instances=[row], request_id=rid)
        assert taken.value.status == 409 and taken.value.job_id == first.id
        assert taken.value.location == first.location
        done = rdv.result(DEMO_DEPLOYMENT, first.id, wait_ms=10_000)
        assert done.status == "done" and done.request_id == rid
        with pytest.raises(RdvError) as ended:
            rdv.cancel(DEMO_DEPLOYMENT, first.id)
        assert ended.value.status == 409 and not isinstance(ended.value, JobExists)
        assert len(rdv.predict(DEMO_DEPLOYMENT, instances=[row], request_id="").request_id) == 32
        with pytest.raises(RdvError) as bad:  # sent, not dropped: the gateway judges it
            rdv.predict(DEMO_DEPLOYMENT, instances=[row], request_id="x" * 129)
        assert bad.value.status == 422 and "X-Request-Id" in str(bad.value.detail)
        assert bad.value.body["detail"] == bad.value.detail
        workers = [system.procs[role].proc.pid for role in ("real", "canary")]
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            pending = rdv.submit(DEMO_DEPLOYMENT, instances=[row])
            cancelled = rdv.cancel(DEMO_DEPLOYMENT, pending.id)
            assert cancelled.status == "failed" and cancelled.error is not None
            assert cancelled.error["cancelled"] is True and cancelled.request_id == pending.id
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)


def test_what_a_caller_of_the_client_met_by_hand(system: System) -> None:
    """Found by a helper's probe: numpy features were not JSON; a request id HTTP cannot
    carry read as an unreachable gateway (safe to retry) or a bare UnicodeEncodeError; a job
    read back by ``result`` or ``cancel`` had no location."""
    data = demo_data()
    row = data.x_test[0]
    with Client(f"http://127.0.0.1:{system.port}", admin_token=TOKEN) as rdv:
        as_numpy = dict(zip(data.names, row.astype(np.float32), strict=True))
        as_float = {name: float(value) for name, value in as_numpy.items()}
        got = rdv.predict(DEMO_DEPLOYMENT, features=as_numpy)
        assert got.rows == rdv.predict(DEMO_DEPLOYMENT, features=as_float).rows
        for bad in (
            "line\nbreak",
            " leading",
            "trailing ",
            "caf\N{LATIN SMALL LETTER E WITH ACUTE}",
        ):
            with pytest.raises(ValueError, match="cannot be an HTTP header"):
                rdv.predict(DEMO_DEPLOYMENT, instances=[row.tolist()], request_id=bad)
        job = rdv.submit(DEMO_DEPLOYMENT, instances=[row.tolist()])
        assert job.location and job.location.endswith(f"/jobs/{job.id}")
        assert rdv.result(DEMO_DEPLOYMENT, job.id, wait_ms=10_000).location == job.location
        with pytest.raises(RdvError):
            rdv.cancel(DEMO_DEPLOYMENT, job.id)  # ended: 409
        listed = rdv.deployments()
        assert isinstance(listed, dict) and listed  # a JSON object, so typed
        version = np.int64(2)  # real's own: a 409
        with pytest.raises(RdvError) as same:  # sent (numpy's int raised TypeError), refused
            rdv.promote(DEMO_DEPLOYMENT, version)  # type: ignore[arg-type]
        assert same.value.status in (409, 422), same.value
        labels = rdv.feedback(DEMO_DEPLOYMENT, request_id=got.request_id, label=np.int64(1))  # type: ignore[arg-type]
        assert labels["accepted"] == 1, labels


def test_the_client_is_typed_for_its_users(tmp_path: Path) -> None:
    """It ships ``py.typed`` (a user's mypy checked nothing of it), and an admin call of the
    async client is an awaitable of the gateway's JSON object, so a missing ``await`` is
    caught (its admin calls returned Any)."""
    from importlib.resources import files

    from mypy import api

    assert files("rdv_client").joinpath("py.typed").is_file()
    user = tmp_path / "user.py"
    user.write_text(
        "from typing import Any\n"
        "from rdv_client import AsyncClient, Client\n"
        "async def f(a: AsyncClient, c: Client) -> None:\n"
        "    forgot: dict[str, Any] = a.deployments()\n"
        "    awaited: dict[str, Any] = await a.deployments()\n"
        "    wrong: int = c.history('d')\n"
        "    import numpy as np\n"  # numpy's labels are sent plain: the hint takes them
        "    c.feedback('d', request_id='r', label=np.int64(1))\n"
        "    c.feedback('d', request_id='r', label=[np.int64(1), 'benign'])\n"
    )
    out, _, status = api.run(["--no-incremental", "--follow-imports=silent", str(user)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 2, out
    assert (
        'user.py:4: error: Incompatible types in assignment (expression has type "Awaitable' in out
    )
    assert (
        'user.py:6: error: Incompatible types in assignment (expression has type "dict[str, Any]"'
        in out
    )


def test_no_answer_is_its_own_error_and_retry_after_may_be_a_date(system: System) -> None:
    """Raw httpx errors escaped the client (found by hand); a Retry-After given as an HTTP date
    failed float()."""
    from rdv_client.calls import retry_after_s as _retry_after

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nothing listens on (bound, never listening)
        port = s.getsockname()[1]
        with Client(f"http://127.0.0.1:{port}") as down, pytest.raises(GatewayUnreachable):
            down.predict(DEMO_DEPLOYMENT, instances=[[1.0]])
    real = system.procs["real"].proc.pid
    os.kill(real, signal.SIGSTOP)  # real's deadline is 200 ms, the canary answers after it
    try:
        slow = Client(f"http://127.0.0.1:{system.port}", timeout=0.05)
        with slow, pytest.raises(GatewayUnreachable, match="no answer in time"):
            slow.predict(DEMO_DEPLOYMENT, instances=[demo_data().x_test[0].tolist()])
    finally:
        os.kill(real, signal.SIGCONT)
    assert _retry_after("3") == 3.0 and _retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= (_retry_after(later) or 0) <= 31
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_a_candidate_from_upload_to_replay_and_the_drift_report_through_the_client(
    system: System,
) -> None:
    """What a data scientist does with a new model, in the client's calls alone: upload it,
    let it shadow, replay the archive against it, retire it; and read and tune drift."""
    rows = demo_data().x_test[:6]
    onnx = (system.data_dir / "models" / DEMO_MODEL / "2" / "model.onnx").read_bytes()
    with Client(f"http://127.0.0.1:{system.port}", admin_token=TOKEN) as rdv:
        for i, row in enumerate(rows):
            rdv.predict(DEMO_DEPLOYMENT, instances=[row.tolist()], request_id=f"cand-{i}")
        made = rdv.upload_model(DEMO_MODEL, onnx, deployment=DEMO_DEPLOYMENT,
                                description="real's artifact again")  # fmt: skip
        version = made["version"]
        assert version > 2 and rdv.model(DEMO_MODEL, version)["sha256"] == made["sha256"]
        assert version in [m["version"] for m in rdv.models(DEMO_MODEL)["models"]]
        rdv.add_challenger(DEMO_DEPLOYMENT, "cand", version, reason="client test")
        assert "cand" in rdv.shadow(DEMO_DEPLOYMENT)["roles"]
        archive = ArchiveReader(system.data_dir / "logbin")
        wait_until(lambda: len(list(archive.records(DEMO_DEPLOYMENT))) >= len(rows), 30, "archive")
        started = rdv.start_replay(DEMO_DEPLOYMENT, version, last=len(rows))
        report = wait_until(
            lambda: (r := rdv.replay(DEMO_DEPLOYMENT, started["id"]))["state"] == "done" and r,
            30, "the replay",
        )  # fmt: skip
        assert report["records"] == len(rows) and report["agreement"]["rate"] == 1.0, report
        assert rdv.replays(DEMO_DEPLOYMENT)["replays"][0]["id"] == started["id"]
        with pytest.raises(RdvError) as finished:
            rdv.resume_replay(DEMO_DEPLOYMENT, started["id"])
        assert finished.value.status == 409
        rdv.remove_challenger(DEMO_DEPLOYMENT, "cand")
        rdv.delete_model(DEMO_MODEL, version)
        with pytest.raises(RdvError) as gone:
            rdv.model(DEMO_MODEL, version)
        assert gone.value.status == 404
        before = rdv.drift_thresholds(DEMO_DEPLOYMENT)
        rdv.set_drift_thresholds(DEMO_DEPLOYMENT, min_requests=before["min_requests"] + 1)
        report = rdv.drift(DEMO_DEPLOYMENT)
        assert report["thresholds"]["min_requests"] == before["min_requests"] + 1
        assert report["roles"]["real"] == f"{DEMO_MODEL}:2", report["roles"]
        assert rdv.drift_features(DEMO_DEPLOYMENT, "mean radius")["feature"] == "mean radius"


def test_an_actor_and_a_poll_the_gateway_would_refuse_are_refused_here() -> None:
    """``actor="José"`` raised httpx's UnicodeEncodeError at every admin call, and a poll of
    0 ms long-polled back to back until the timeout (found by a review)."""
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("http://127.0.0.1:9", actor="Jos\u00e9")
    with pytest.raises(ValueError, match="printable ASCII"):
        AsyncClient("http://127.0.0.1:9", actor="")
    with Client("http://127.0.0.1:9") as rdv, pytest.raises(ValueError, match="poll_ms"):
        rdv.wait("d", "1-00000000000000000000", poll_ms=0)
