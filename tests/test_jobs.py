"""Async jobs with real processes (gateways, workers, log bin) on a real Redis, single node and
cluster: results equal predict's answers, long polls, a gateway killed with jobs in hand,
expiry, cancel, and bad input refused before anything is written."""

from __future__ import annotations

import asyncio
import signal
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.archive import ArchiveReader
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, RdvProcess, System, launch_system, stream_head, wait_until
from rendezvous import names
from rendezvous.bus.server import free_port
from rendezvous.decision import decode_entries
from rendezvous.schedule import Schedule

# real's deadline near the timeout: the answers compared are always real's
SCHEDULE = Schedule(real_deadline_ms=800, timeout_ms=1000, fallbacks=("canary",), grace_ms=50)
JOBS = f"/v1/deployments/{DEMO_DEPLOYMENT}/jobs"
JOB_TIMEOUT_MS = 2500  # a job's predict waits this long for the models
CLAIM_IDLE_MS = 300  # the claim waits a job's timeout + 1 s all the same: 3.5 s
MAX_WAIT_MS = 8000
ENV = {"RDV_GATEWAY_PROCESSES": "1", "RDV_JOB_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
       "RDV_JOB_MAX_WAIT_MS": str(MAX_WAIT_MS),
       "RDV_JOB_TIMEOUT_MS": str(JOB_TIMEOUT_MS)}  # fmt: skip


@pytest.fixture(scope="module")
def system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, SCHEDULE, **ENV) as sys:
        workers(sys, True)
        yield sys
        if "gateway-2" in sys.procs:
            OTHER.pop(sys.port).close()


def workers(system: System, on: bool) -> None:
    """Start (both at once) or stop the real and canary workers."""
    for role in ("real", "canary"):
        if on and role not in system.procs:
            system.start(role, "worker", "--deployment", DEMO_DEPLOYMENT, "--role", role,
                         "--consumer", f"{role}-e2e")  # fmt: skip
        elif not on and role in system.procs:
            system.stop(role)
    if on:
        for role in ("real", "canary"):
            wait_until(lambda role=role: system.live(role), 30, f"{role} worker heartbeat")


def bodies(n: int) -> list[dict]:
    """Alternately one row by name and a batch of rows."""
    x = demo_data().x_test
    out: list[dict] = []
    for i in range(n):
        if i % 2:
            out.append({"instances": x[i : i + 1 + i % 3].tolist()})
        else:
            out.append({"features": dict(zip(demo_data().names, map(float, x[i]), strict=True))})
    return out


def submit(http: httpx.Client, body: dict, **headers: str) -> dict:
    resp = http.post(JOBS, json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    assert doc["status"] == "pending"
    assert resp.headers["location"] == doc["location"] == f"{JOBS}/{doc['id']}"
    assert names.JOB_ID_PATTERN.fullmatch(doc["id"])
    return doc


def long_poll(http: httpx.Client, job_id: str, wait_ms: int = MAX_WAIT_MS) -> dict:
    resp = http.get(f"{JOBS}/{job_id}", params={"wait_ms": wait_ms})
    assert resp.status_code == 200, resp.text
    return resp.json()


def same_as_predict(job: dict, answer: dict) -> None:
    """A job's result is the predict's answer: the same model and predictions (the request
    id and latency are the job's own)."""
    assert job["status"] == "done", job
    result = job["result"]
    assert set(result) == set(answer) == {"request_id", "model", "predictions", "latency_ms"}
    assert result["model"] == answer["model"] == {"name": DEMO_DEPLOYMENT, "version": 2,
                                                  "role": "real"}  # fmt: skip
    assert result["predictions"] == answer["predictions"]


def test_jobs_answer_what_predict_answers(system: System) -> None:
    sent = bodies(24)
    jobs = [submit(system.http, body) for body in sent[:-1]]
    jobs.append(submit(system.http, sent[-1], **{"X-Request-Id": "job-own-id"}))
    assert jobs[-1]["request_id"] == "job-own-id"
    assert all(j["request_id"] == j["id"] for j in jobs[:-1])
    # the same body under the same X-Request-Id again (a retry that lost its 202): 409 naming
    # the job that has it; another body under it: 409 naming nothing (it named the job to
    # whoever guessed the id, with its result and its cancel; found by hand)
    again = system.http.post(JOBS, json=sent[-1], headers={"X-Request-Id": "job-own-id"})
    assert again.status_code == 409 and again.json()["location"] == jobs[-1]["location"]
    other = system.http.post(JOBS, json=sent[0], headers={"X-Request-Id": "job-own-id"})
    assert other.status_code == 409 and set(other.json()) == {"detail"}
    assert "another body" in other.json()["detail"]

    # half long-polled (several at once), half polled until done
    with ThreadPoolExecutor(8) as pool:
        polled = list(pool.map(lambda j: long_poll(system.http, j["id"]), jobs[::2]))

    def done(job_id: str) -> dict | None:
        doc = system.http.get(f"{JOBS}/{job_id}").json()
        return doc if doc["status"] != "pending" else None

    polled += [wait_until(lambda j=j: done(j["id"]), 10, "job done") for j in jobs[1::2]]
    by_id = {doc["id"]: doc for doc in polled}
    assert set(by_id) == {j["id"] for j in jobs}
    for job, body in zip(jobs, sent, strict=True):
        doc = by_id[job["id"]]
        assert doc["result"]["request_id"] == job["request_id"]
        same_as_predict(doc, system.predict(body).json())

    # the normal rendezvous path: a decision record per job, real and canary both scored
    def recorded() -> dict | None:
        entries = system.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
        found = {d.request_id: d for d in decode_entries(entries)}
        return found if {j["request_id"] for j in jobs} <= set(found) else None

    records = wait_until(recorded, 10, "decision records of the jobs")
    assert all(set(records[j["request_id"]].outputs) == {"real", "canary"} for j in jobs)
    assert system.r.xlen(names.jobs_stream(DEMO_DEPLOYMENT)) == 0  # every entry ended


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"features": ', 422, "json_invalid"),
        (b'{"features": {"mean radius": 1.0}}', 422, "missing feature 'mean texture'"),
        (b'{"instances": [[1.0, 2.0]]}', 422, "row has 2 values"),
        (b'{"instances": [[1.0]], "features": {}}', 422, "exactly one"),
        (b'{"instances": [' + b"[0.5]," * 300_000 + b"[0.5]]}", 413, "larger than"),
        (zlib.compress(b'{"instances": [[0.5]]}'), 415, "uncompressed"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    system: System, body: bytes, status: int, needle: str
) -> None:
    streams = [names.input_stream(DEMO_DEPLOYMENT), names.jobs_stream(DEMO_DEPLOYMENT)]

    def last_ids() -> list[bytes | None]:
        return [stream_head(system.r, s) for s in streams]

    def invalid() -> float:  # refused submits are counted as refused predicts are
        for family in text_string_to_metric_families(system.http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == "rdv_requests_total" and sample.labels == {
                    "deployment": DEMO_DEPLOYMENT, "outcome": "invalid"}:  # fmt: skip
                    return float(sample.value)
        return 0.0

    before, counted = last_ids(), invalid()
    headers = {"content-type": "application/json"}
    if status == 415:
        headers["content-encoding"] = "deflate"
    resp = system.http.post(JOBS, content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert needle in resp.text
    assert last_ids() == before
    assert invalid() == counted + 1  # the body cap's 413 and the 415 too (found by hand)


def test_unknown_deployment_ids_and_waits_out_of_bounds_are_clear(system: System) -> None:
    streams = [names.input_stream(DEMO_DEPLOYMENT), names.jobs_stream(DEMO_DEPLOYMENT)]
    before = [stream_head(system.r, s) for s in streams]
    body = bodies(1)[0]
    resp = system.http.post("/v1/deployments/nope/jobs", json=body)
    assert resp.status_code == 404 and "nope" in resp.json()["detail"]
    resp = system.http.post(JOBS, json=body, headers={"X-Request-Id": "x" * 200})
    assert resp.status_code == 422 and "X-Request-Id" in resp.text
    unknown = f"{int(time.time() * 1000):x}-{'0' * 20}"
    for job_id in (unknown, "not-a-job"):
        resp = system.http.get(f"{JOBS}/{job_id}")
        assert resp.status_code == 404 and resp.json()["expired"] is False, resp.text
        assert "no job" in resp.json()["detail"] and job_id in resp.json()["detail"]
    resp = system.http.get(f"{JOBS}/{'j' * 5000}")  # echoed cut, not 5,000 characters twice
    assert resp.status_code == 404 and resp.json()["id"] == "j" * 80 and len(resp.text) < 400
    assert system.http.delete(f"{JOBS}/{unknown}").status_code == 404
    for job_id in (unknown, "not-a-job"):  # the deployment is what is missing, and said so
        for method in ("GET", "DELETE"):
            resp = system.http.request(method, f"/v1/deployments/nope/jobs/{job_id}")
            assert resp.status_code == 404 and "deployment 'nope'" in resp.json()["detail"]
    for wait_ms in (MAX_WAIT_MS + 1, -1, "soon"):
        resp = system.http.get(f"{JOBS}/{unknown}", params={"wait_ms": wait_ms})
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["query", "wait_ms"]
        if wait_ms == MAX_WAIT_MS + 1:  # the bound, for a client to poll within (rdv_client)
            assert resp.json()["detail"][0]["ctx"] == {"le": MAX_WAIT_MS}, resp.text
    assert [stream_head(system.r, s) for s in streams] == before


def test_cancel_and_a_job_past_the_timeout(system: System) -> None:
    workers(system, False)  # nobody answers: jobs stay pending until the timeout
    first = submit(system.http, bodies(1)[0])
    second = submit(system.http, bodies(2)[1])
    t0 = time.monotonic()
    doc = long_poll(system.http, first["id"], wait_ms=300)
    assert doc == {"id": first["id"], "status": "pending", "request_id": first["request_id"]}
    assert 0.3 <= time.monotonic() - t0 < 1.2

    cancelled = system.http.delete(first["location"])
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "failed" and cancelled.json()["error"]["cancelled"]
    assert system.http.get(first["location"]).json() == cancelled.json()
    again = system.http.delete(first["location"])
    assert again.status_code == 409 and "already ended" in again.json()["detail"]

    t0 = time.monotonic()
    doc = long_poll(system.http, second["id"])  # ends at the job's timeout
    assert time.monotonic() - t0 < JOB_TIMEOUT_MS / 1000 + 1.0
    assert doc["status"] == "failed" and doc["error"]["status"] == 504, doc
    assert "no model answered within" in doc["error"]["detail"]
    assert system.http.delete(second["location"]).status_code == 409
    # the cancelled job's run ended too (its answer dropped): nothing is left queued
    wait_until(lambda: system.r.xlen(names.jobs_stream(DEMO_DEPLOYMENT)) == 0, 5, "queue empty")
    assert system.http.get(first["location"]).json()["error"]["cancelled"]


def test_a_job_waits_for_busy_models_past_the_deployments_timeout(system: System) -> None:
    """A job's predict waits up to ``RDV_JOB_TIMEOUT_MS`` for the models, not the deployment's
    realtime timeout: a burst of 1,000-row jobs queued seconds of work before the models and
    nearly every job ended in 504 (found by a probe). With the models paused past the
    deployment's timeout, a predict gets its 504 and a job waits, then gets real's answer."""
    workers(system, True)
    body = bodies(2)[1]
    paused = [system.procs[role].proc for role in ("real", "canary")]
    for proc in paused:
        proc.send_signal(signal.SIGSTOP)
    try:
        job = submit(system.http, body)
        late = system.http.post(PREDICT, json=body)  # waits out the deployment's timeout
        assert late.status_code == 504, late.text
        assert long_poll(system.http, job["id"], wait_ms=200)["status"] == "pending"
    finally:
        for proc in paused:
            proc.send_signal(signal.SIGCONT)
    doc = long_poll(system.http, job["id"])
    same_as_predict(doc, system.http.post(PREDICT, json=body).json())
    assert SCHEDULE.timeout_ms < doc["result"]["latency_ms"] < JOB_TIMEOUT_MS


OTHER: dict[int, httpx.Client] = {}
"""The first gateway's port -> a client of the second gateway of that system."""


def test_a_burst_of_submits_polls_and_probes_waits_for_redis_connections(system: System) -> None:
    """Found by a helper's probe: the gateway's Redis pool failed at once past redis-py's 100
    connections, so a burst of 120-300 job submits, long polls or readiness probes met 503
    (MaxConnectionsError) from a healthy Redis. They now wait for a free connection."""
    workers(system, True)
    burst = 300
    body = bodies(1)[0]

    async def run() -> Counter[tuple[str, int]]:
        limits = httpx.Limits(max_connections=burst)
        url = f"http://127.0.0.1:{system.port}"
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:

            async def one(kind: str, method: str, path: str, **kw: Any) -> tuple[str, int]:
                resp = await http.request(method, path, **kw)
                return kind, resp.status_code

            submits = await asyncio.gather(*(http.post(JOBS, json=body) for _ in range(burst)))
            ids = [r.json()["id"] for r in submits if r.status_code == 202]
            seen = Counter(("submit", r.status_code) for r in submits)
            calls = [one("poll", "GET", f"{JOBS}/{j}", params={"wait_ms": 3000}) for j in ids]
            calls += [one("ready", "GET", f"/v2/models/{DEMO_DEPLOYMENT}/ready")
                      for _ in range(burst)]  # fmt: skip
            seen.update(await asyncio.gather(*calls))
            return seen

    seen = asyncio.run(run())
    print(f"\n[jobs] a burst of {burst} submits, then polls and probes: {dict(seen)}")
    assert seen == Counter({("submit", 202): burst, ("poll", 200): burst, ("ready", 200): burst})


def other_gateway(system: System) -> httpx.Client:
    """A second gateway on the same Redis, started on first use; it keeps the jobs it takes
    for 1 s only (RDV_JOB_TTL_S)."""
    if "gateway-2" not in system.procs:
        port = free_port()
        env = {**system.env, "RDV_PORT": str(port), "RDV_JOB_TTL_S": "1"}
        system.procs["gateway-2"] = RdvProcess(["gateway"], env, system.logs / "gateway-2.log")
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
        wait_until(lambda: http.get("/healthz").status_code == 200, 30, "gateway-2")
        OTHER[system.port] = http
    return OTHER[system.port]


def test_jobs_outlive_the_gateway_that_took_them(system: System) -> None:
    """Jobs taken by a gateway that is killed (kill -9) while their predicts wait are run again
    by another gateway, and answered through it."""
    workers(system, False)
    sent = bodies(12)
    jobs = [submit(system.http, body, **({"X-Request-Id": f"kill-{i}"} if i % 3 == 0 else {}))
            for i, body in enumerate(sent)]  # fmt: skip
    stream = names.jobs_stream(DEMO_DEPLOYMENT)
    wait_until(lambda: system.r.xpending(stream, names.JOBS_GROUP)["pending"] == len(jobs), 5,
               "the first gateway running every job")  # fmt: skip
    reader = ArchiveReader(system.data_dir / "logbin")
    ids = {job["id"] for job in jobs}

    def runs_archived(runs: int) -> Counter[str] | None:
        seen = Counter(r.get("job_id") for r in reader.records(DEMO_DEPLOYMENT, dedupe=False))
        return seen if all(seen[job_id] >= runs for job_id in ids) else None

    wait_until(lambda: runs_archived(1), 10, "the first run of every job published")
    system.procs.pop("gateway").kill()
    t0 = time.monotonic()
    workers(system, True)
    http = other_gateway(system)
    with ThreadPoolExecutor(len(jobs)) as pool:
        docs = list(pool.map(lambda j: long_poll(http, j["id"]), jobs))
    print(f"\n[jobs] {len(jobs)} jobs of a gateway killed with them in hand answered by "
          f"another {time.monotonic() - t0:.1f} s after the kill")  # fmt: skip
    for job, doc, body in zip(jobs, docs, sent, strict=True):
        assert doc["result"]["request_id"] == job["request_id"]
        same_as_predict(doc, http.post(PREDICT, json=body).json())
    assert system.r.xlen(stream) == 0

    # Each job's input was published by both runs, and the log bin archived both; the
    # archive's readers (export, replays) keep its first run's record only.
    wait_until(lambda: runs_archived(2), 10, "both runs of every job archived")
    kept = [r for r in reader.records(DEMO_DEPLOYMENT) if r.get("job_id") in ids]
    assert sorted(r["job_id"] for r in kept) == sorted(ids)
    by_job = {job["id"]: job for job in jobs}
    assert all(r["request_id"] == by_job[r["job_id"]]["request_id"] for r in kept)


def test_an_expired_job_says_so(system: System) -> None:
    workers(system, True)
    http = other_gateway(system)
    job = submit(http, bodies(1)[0])
    assert long_poll(http, job["id"])["status"] == "done"
    time.sleep(1.2)  # the result is kept 1 s after the job's end
    resp = http.get(job["location"])
    assert resp.status_code == 404, resp.text
    assert resp.json()["expired"] is True
    assert f"job {job['id']} of deployment {DEMO_DEPLOYMENT} expired" in resp.json()["detail"]
    assert "RDV_JOB_TTL_S" in resp.json()["detail"]
