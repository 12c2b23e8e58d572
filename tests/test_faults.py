"""Faults lose nothing: a killed worker, a Redis restart, overload and SIGTERM under load.

Real processes, a real Redis server, real HTTP; every load is bounded in count and time, and
each test prints its figures (sent, answered, failed, lost, archived)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.archive import ArchiveReader
from models.train import DEMO_DEPLOYMENT
from processes import Load, System, bodies, launch_system, report, wait_until
from rendezvous import names
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration  # real processes and Redis servers of its own

SCHEDULE = Schedule(real_deadline_ms=50, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)
CLAIM_IDLE_MS = 1000


def archived_ids(system: System) -> set[str]:
    reader = ArchiveReader(system.data_dir / "logbin")
    return {r["request_id"] for r in reader.records(DEMO_DEPLOYMENT) if "request_id" in r}


def wait_archived(system: System, ids: set[str], timeout_s: float = 15) -> set[str]:
    def done() -> set[str] | None:
        got = archived_ids(system)
        return got if ids <= got else None

    try:
        return wait_until(done, timeout_s, "the archive to hold every answered request")
    except AssertionError:
        return archived_ids(system)


@pytest.fixture
def system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(
        bus_url, demo_data_dir, tmp_path_factory, SCHEDULE,
        RDV_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
    ) as sys:  # fmt: skip
        yield sys


def test_kill_9_real_worker_under_load_loses_no_request(system: System) -> None:
    system.start_worker("real")
    system.start_worker("canary")
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=6, prefix="kill") as load:
        time.sleep(1.5)
        system.procs.pop("real").kill()  # SIGKILL: no chance to ack its batch
        time.sleep(1.5)
        system.start_worker("real")  # as `rdv serve`'s supervisor would, same consumer name
        time.sleep(1.5)
    roles = {r["model"]["role"] for r in load.results if r["status"] == 200}
    stream, group = names.input_stream(DEMO_DEPLOYMENT), names.model_group("real")

    def no_stale_pending() -> bool:
        stale = [p for p in system.r.xpending_range(stream, group, "-", "+", 1000)
                 if p["time_since_delivered"] > CLAIM_IDLE_MS]  # fmt: skip
        return not stale

    wait_until(no_stale_pending, 10, "no pending entries older than the claim idle time")
    archived = wait_archived(system, load.ok_ids())
    figures = {**load.figures(), "failed": len(load.results) - load.count(200),
               "archived": len(archived & load.ok_ids()), "roles": sorted(roles)}  # fmt: skip
    report("kill -9 real worker", figures)
    assert load.results and load.count(200) == len(load.results), figures
    assert "canary" in roles and "real" in roles
    assert load.ok_ids() <= archived


def test_sigterm_under_load_answers_every_accepted_request(system: System) -> None:
    system.start_worker("real")
    system.start_worker("canary")
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=4, prefix="term") as load:
        time.sleep(1.5)
        system.stop("gateway")  # SIGTERM, then wait for the graceful exit
    errors = [r for r in load.results if r["status"] not in (200, None)]
    system.stop("logbin")  # it archives what is left before it exits
    archived = archived_ids(system)
    figures = {**load.figures(), "answered_with_error": len(errors),
               "archived": len(archived & load.ok_ids())}  # fmt: skip
    report("SIGTERM gateway under load", figures)
    assert load.count(200) > 0 and not errors, figures
    assert load.ok_ids() <= archived


def test_overload_gets_fast_429_and_the_rest_succeed(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import asyncio

    with launch_system(
        bus_url, demo_data_dir, tmp_path_factory, SCHEDULE, RDV_MAX_IN_FLIGHT="8"
    ) as system:
        # Only the canary: every accepted request waits out real's deadline (50 ms), so 40
        # concurrent requests overrun a bound of 8 in flight.
        system.start_worker("canary")
        body = bodies(1)[0]

        async def burst() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{system.port}", timeout=10,
                limits=httpx.Limits(max_connections=64),
            ) as http:  # fmt: skip

                async def one() -> tuple[int, float]:
                    t0 = time.perf_counter()
                    resp = await http.post("/v1/deployments/breast-cancer/predict", json=body)
                    return resp.status_code, (time.perf_counter() - t0) * 1000

                return await asyncio.gather(*(one() for _ in range(40)))

        outcomes = asyncio.run(burst())
    statuses = [s for s, _ in outcomes]
    figures = {"sent": len(outcomes), "200": statuses.count(200), "429": statuses.count(429)}
    report("overload", figures)
    assert set(statuses) <= {200, 429}, figures
    assert statuses.count(429) >= 1 and statuses.count(200) >= 8, figures
    fast = sorted(ms for s, ms in outcomes if s == 429)
    assert fast[len(fast) // 2] < 1000, "429s must come at once, not after queueing"


def test_redis_restart_under_load(
    demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = EmbeddedRedis(tmp_path_factory.mktemp("restart-redis")).start()
    try:
        with launch_system(
            server.url, demo_data_dir, tmp_path_factory, SCHEDULE,
            RDV_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
        ) as system:  # fmt: skip
            system.start_worker("real")
            system.start_worker("canary")
            with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=9, prefix="rr") as load:
                time.sleep(1.5)
                server.stop()  # SIGTERM: Redis fsyncs its append-only file and exits
                outage_start = time.monotonic()
                time.sleep(0.5)
                ready = system.http.get("/readyz")
                time.sleep(1.0)
                server.start()
                outage_s = time.monotonic() - outage_start
                # Every component reconnects by itself: real answers again.
                wait_until(lambda: any(r["status"] == 200 and r["t"] > time.monotonic() - 0.5
                                       for r in load.results[-20:]), 15, "recovery")  # fmt: skip
                recovered_at = time.monotonic()
                time.sleep(1.5)
            assert ready.status_code == 503
            statuses = {r["status"] for r in load.results}
            late = [r for r in load.results if r["t"] > recovered_at]
            archived = wait_archived(system, load.ok_ids())
            lost = load.ok_ids() - archived
            figures = {**load.figures(), "outage_s": round(outage_s, 2),
                       "archived": len(archived & load.ok_ids()), "lost": len(lost)}  # fmt: skip
            report("Redis restart under load", figures)
            assert statuses <= {200, 503, 504}, figures
            assert load.count(503) > 0, "requests during the outage are refused with 503"
            assert all(r["retry_after"] for r in load.results if r["status"] == 503)
            late_failures = [r for r in late if r["status"] != 200]
            assert late and not late_failures, ("recovered without restarts", recovered_at,
                                                late_failures[:5])  # fmt: skip
            assert not lost, sorted(lost)[:10]
            assert all(p.alive() for p in system.procs.values())
    finally:
        server.stop()


@contextlib.contextmanager
def answering(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """A system on ``redis_url`` with real and canary workers, once it has answered."""
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_WORKER_BLOCK_MS="200") as system:  # fmt: skip
        system.start_worker("real")
        system.start_worker("canary")
        predict, body = "/v1/deployments/breast-cancer/predict", bodies(1)[0]
        wait_until(lambda: system.http.post(predict, json=body).status_code == 200, 20,
                   "a first answer")  # fmt: skip
        yield system


def test_a_redis_at_its_memory_limit_is_ridden_out_and_recovers_by_itself(
    demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """maxmemory with noeviction, filled: workers and the log bin stay up (the OOM reply is a
    transient fault), predicts answer 503 naming the memory limit, the gateway warned at start
    that the caps outgrow the limit, and once memory frees predicts answer 200 again."""
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("full-redis"),
        extra_args=["--maxmemory", "24mb", "--maxmemory-policy", "noeviction"],
    ).start()
    try:
        with answering(server.url, demo_data_dir, tmp_path_factory) as system:
            body = bodies(1)[0]
            predict = "/v1/deployments/breast-cancer/predict"
            client = redis.Redis.from_url(server.url)
            full = threading.Event()
            done = threading.Event()

            def fill() -> None:  # to the limit, and kept there as trimming frees memory
                i = 0
                while not done.is_set():
                    try:
                        client.set(f"filler:{i}", b"x" * (64 * 1024 if not full.is_set() else 512))
                        i += 1
                    except redis.ResponseError:  # OOM
                        full.set()
                        done.wait(0.01)

            filler = threading.Thread(target=fill)
            filler.start()
            try:
                assert full.wait(30), "Redis never filled"
                time.sleep(3.0)  # heartbeats and stats writes meet the limit meanwhile
                refused = system.http.post(predict, json=body)
                assert refused.status_code == 503, refused.text
                assert "memory limit" in refused.json()["detail"]
                assert refused.headers.get("retry-after")
                assert all(p.alive() for p in system.procs.values()), "a process died of OOM"
            finally:
                done.set()
                filler.join(10)
            for key in client.scan_iter("filler:*", count=1000):
                client.delete(key)
            wait_until(lambda: system.http.post(predict, json=body).status_code == 200, 20,
                       "predicts to answer again once memory frees")  # fmt: skip
            assert all(p.alive() for p in system.procs.values())
            assert "maxmemory is 24 MB" in system.procs["gateway"].log_text()
            client.close()
    finally:
        server.stop()


def test_a_redis_that_cannot_persist_is_ridden_out_and_recovers_by_itself(
    demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Redis refusing writes because it cannot write to disk (MISCONF: under ``rdv serve`` its
    file shares the data folder's disk with the archive) made every worker stop on an error,
    so predicts timed out after the disk had room again, and the log bin logged a traceback
    four times a second (found by a helper's probe): now a passing fault, as OOM is."""
    folder = tmp_path_factory.mktemp("misconf")
    server = EmbeddedRedis(folder / "redis").start()
    client = redis.Redis.from_url(server.url)
    try:
        with answering(server.url, demo_data_dir, tmp_path_factory) as system:
            body = bodies(1)[0]
            predict = "/v1/deployments/breast-cancer/predict"
            gone = folder / "gone"  # its snapshot fails: a full or lost disk, to Redis
            gone.mkdir()
            client.config_set("save", "3600 1")
            client.config_set("dir", str(gone))
            gone.rmdir()
            client.bgsave()
            wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err", 10,
                       "the snapshot to fail")  # fmt: skip
            time.sleep(2.0)  # workers, log bin and heartbeats meet the refusal meanwhile
            refused = system.http.post(predict, json=body)
            assert refused.status_code == 503, refused.text
            assert "cannot write its data to disk" in refused.json()["detail"], refused.text
            assert "user_script" not in refused.text  # not the script's internals
            client.config_set("dir", str(folder / "redis"))
            client.bgsave()
            wait_until(lambda: system.http.post(predict, json=body).status_code == 200, 20,
                       "predicts to answer again once Redis can write")  # fmt: skip
            assert all(p.alive() for p in system.procs.values())
            for role in ("real", "canary"):
                assert "stopped on an error" not in system.procs[role].log_text()
            assert system.procs["logbin"].log_text().count("Traceback") == 0
    finally:
        client.close()
        server.stop()


def test_a_log_bin_that_stops_archiving_bounds_the_backlog_in_bytes(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With the log bin gone the input stream is not trimmed: past RDV_MAX_BACKLOG_BYTES of it,
    predicts answer 503 at once, and once the log bin is back and has archived, 200 again."""
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_MAX_BACKLOG_BYTES=str(2**20)) as system:  # fmt: skip
        system.start_worker("real")
        system.start_worker("canary")
        system.stop("logbin")
        body = bodies(1)[0]
        predict = "/v1/deployments/breast-cancer/predict"
        statuses: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 503 not in statuses:
            resp = system.http.post(predict, json=body)
            statuses.append(resp.status_code)
        assert statuses.count(200) > 100 and statuses[-1] == 503, statuses[-5:]
        assert "MB of entries" in resp.json()["detail"] and resp.headers.get("retry-after")
        system.start("logbin", "logbin")
        wait_until(lambda: system.http.post(predict, json=body).status_code == 200, 30,
                   "predicts to answer again once the log bin archived the backlog")  # fmt: skip


def test_a_canary_that_stays_down_does_not_take_predictions_down(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No canary worker at all, past the backlog bound's worth of requests: the canary's group
    is moved forward once it lags RDV_MAX_ROLE_LAG entries, so real keeps answering (before,
    the stream filled to RDV_MAX_BACKLOG and every predict answered 503)."""
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_MAX_ROLE_LAG="100", RDV_MAX_BACKLOG="1500") as system:  # fmt: skip
        system.start_worker("real")
        with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=40, prefix="lag",
                  max_requests=3000) as load:  # fmt: skip
            wait_until(lambda: len(load.results) >= 3000, 45, "3,000 answers")
        figures = load.figures()
        report("canary down past the role-lag bound", figures)
        assert load.count(200) == len(load.results) >= 3000, figures
        metrics = system.http.get("/metrics").text
        skipped = [
            line
            for line in metrics.splitlines()
            if line.startswith("rdv_role_skipped_entries_total") and 'role="canary"' in line
        ]
        assert skipped and float(skipped[0].rsplit(" ", 1)[1]) > 0, skipped


def test_a_redis_that_does_not_answer_makes_503_not_a_hang(
    demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """And ``/metrics`` still serves the cluster state it last read, saying so: a scrape during
    a stall dropped every series read from Redis, so an alert on them (no live worker, drift)
    resolved and fired again a scrape later (a helper's probe)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("pause-redis")).start()
    live_real = 'rdv_live_workers{deployment="breast-cancer",role="real"} 1.0'
    try:
        with launch_system(server.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                           RDV_REDIS_TIMEOUT_S="0.5") as system:  # fmt: skip
            system.start_worker("real")
            wait_until(lambda: live_real in system.http.get("/metrics").text, 20, "a live real")
            assert "rdv_state_read_ok 1.0" in system.http.get("/metrics").text
            client = redis.Redis.from_url(server.url)
            client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
            t0 = time.perf_counter()
            resp = system.http.post("/v1/deployments/breast-cancer/predict", json=bodies(1)[0])
            elapsed = time.perf_counter() - t0
            report("Redis paused", {"status": resp.status_code, "seconds": round(elapsed, 2)})
            assert resp.status_code == 503 and resp.headers["retry-after"]
            assert elapsed < 2.5
            scrape = system.http.get("/metrics")
            assert scrape.status_code == 200 and live_real in scrape.text, scrape.text[-2000:]
            assert "rdv_state_read_ok 0.0" in scrape.text
            age = [line for line in scrape.text.splitlines()
                   if line.startswith("rdv_state_age_seconds ")]  # fmt: skip
            assert age and float(age[0].split()[1]) > 0.4, age
            client.execute_command("CLIENT", "UNPAUSE")
            wait_until(lambda: "rdv_state_read_ok 1.0" in system.http.get("/metrics").text, 10,
                       "a scrape that read Redis again")  # fmt: skip
            # Redis answering with errors (BUSY running a script; LOADING after a restart):
            # taken as absent, the scrape said it had read Redis, every series at 0 (a probe)
            client.config_set("lua-time-limit", 100)
            busy = threading.Thread(target=client.eval, args=(SPIN, 0, 1500), daemon=True)
            busy.start()
            time.sleep(0.4)
            scrape = system.http.get("/metrics")
            ready = system.http.get("/readyz")  # it said "Redis is unavailable: ResponseError"
            busy.join(5)
            assert scrape.status_code == 200 and live_real in scrape.text, scrape.text[-2000:]
            assert "rdv_state_read_ok 0.0" in scrape.text
            assert ready.status_code == 503 and "busy running a script" in ready.text, ready.text
            client.close()
    finally:
        server.stop()


SPIN = """local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 > stop
return 1"""
"""A script that keeps Redis busy for ARGV[1] ms (past ``lua-time-limit`` others get BUSY)."""


def test_requests_that_waited_past_their_deadline_for_a_stalled_redis_are_not_scored(
    demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Redis stalls (``CLIENT PAUSE WRITE`` until every caller is answered) while predicts of
    a 300 ms timeout arrive: their XADDs queue in the gateway's appender behind the one Redis
    holds, and go out after the pause, long past their deadlines. The worker drops them as
    expired, from the time each XADD was sent (the entry's ``t``); it scored every one, for
    callers answered a second before, when only the time since the envelope was built
    counted."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("stall-redis")).start()
    schedule = Schedule(real_deadline_ms=200, timeout_ms=300)
    try:
        with launch_system(server.url, demo_data_dir, tmp_path_factory, schedule,
                           RDV_REDIS_TIMEOUT_S="5") as system:  # fmt: skip
            system.start_worker("real")
            assert system.predict(bodies(1)[0]).status_code == 200
            client = redis.Redis.from_url(server.url)
            # at most 10 s, lifted once all are answered: a fixed pause can run out before a
            # loaded host's last caller reached Redis, which then takes it in time
            client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
            statuses: list[int] = []

            def call(body: dict) -> None:
                with httpx.Client(base_url=system.http.base_url, timeout=10) as http:
                    path = f"/v1/deployments/{DEMO_DEPLOYMENT}/predict"
                    statuses.append(http.post(path, json=body).status_code)

            callers = [threading.Thread(target=call, args=(b,)) for b in bodies(8)]
            for caller in callers:
                caller.start()
                time.sleep(0.02)
            for caller in callers:
                caller.join(15)
            client.execute_command("CLIENT", "UNPAUSE")
            assert len(statuses) == 8 and 200 not in statuses, statuses

            def counters() -> dict | None:
                import json

                raw = client.hgetall(names.stats_key(DEMO_DEPLOYMENT))
                stats = [json.loads(v) for v in raw.values()]
                done = sum(s["expired"] + s["scored"] for s in stats)
                return {k: sum(s[k] for s in stats) for k in ("expired", "scored")} if (
                    done >= 9) else None  # fmt: skip

            seen = wait_until(counters, 10, "the worker's counters")
            report("stalled appends", {"statuses": statuses, **seen})
            assert seen["expired"] >= 6 and seen["scored"] <= 3, seen
            client.close()
    finally:
        server.stop()
