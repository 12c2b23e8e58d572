"""Processes whose wall clocks disagree (hosts without NTP, a resumed VM): a worker's clock
seconds off the gateway's must not make it drop every request as expired, report negative or
inflated queue waits, or look dead to readiness. Each skewed process gets its offset from a
``sitecustomize`` on its PYTHONPATH that shifts ``time.time`` and ``time.time_ns`` (the
machine's clock and ``time.monotonic`` stay as they are)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from models.train import DEMO_DEPLOYMENT
from processes import RdvProcess, System, bodies, launch_system, wait_until
from rendezvous import names
from rendezvous.bus import clock
from rendezvous.decision import decode_entries
from rendezvous.schedule import Schedule

SKEW = """
import os, time
_off = float(os.environ.get("RDV_TEST_CLOCK_SKEW_MS", "0")) / 1000
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _off
time.time_ns = lambda: _time_ns() + int(_off * 1e9)
"""
TOKEN = "skew-token"


def port_in_range() -> int:
    """A free port among those this suite's servers may take (43000-43999)."""
    for port in range(43000 + os.getpid() % 900, 44000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 43000-43999")


def skewed_env(folder: Path, skew_ms: int) -> dict[str, str]:
    """The environment that sets a process's wall clock ``skew_ms`` off the machine's."""
    (folder / "sitecustomize.py").write_text(SKEW)
    path = os.pathsep.join([str(folder), os.getcwd(), os.environ.get("PYTHONPATH", "")])
    return {"RDV_TEST_CLOCK_SKEW_MS": str(skew_ms), "PYTHONPATH": path}


def start_skewed_worker(system: System, role: str, skew_ms: int, folder: Path) -> None:
    """A worker for ``role`` whose wall clock is ``skew_ms`` off the machine's."""
    env = {**system.env, **skewed_env(folder, skew_ms)}
    args = ["worker", "--deployment", DEMO_DEPLOYMENT, "--role", role, "--consumer", f"{role}-e2e"]
    system.procs[role] = RdvProcess(args, env, system.logs / f"{role}.log")
    key = names.workers_key(DEMO_DEPLOYMENT)
    heard = lambda: any(m.decode().startswith(f"{role}|") for m in system.r.zrange(key, 0, -1))  # noqa: E731
    wait_until(heard, 30, f"{role} worker heartbeat")


@pytest.mark.pure
def test_waits_are_judged_on_redis_time_not_the_local_clock() -> None:
    """Redis's time of the read against the entry's id; the local clock only without it."""
    deadline, enqueued = 1_000_000_1000, 1_000_000_0000.0  # 1 s left at the publish
    # The local clock 2 s ahead: still in time, and waited 30 ms by Redis's clock (from the
    # middle of the id's millisecond: the XADD ran somewhere in it).
    assert clock.waited(b"10000000030-0", deadline, enqueued, 10000000060.0, 1e10 + 2060) == (
        False, 29.5)  # fmt: skip
    # Read in the millisecond of the XADD: under a millisecond, never a whole one.
    assert clock.waited(b"10000000030-0", deadline, enqueued, 10000000030.75, 0)[1] == 0.25
    assert clock.waited(b"10000000030-0", deadline, enqueued, 10000000030.25, 0)[1] == 0.0
    assert clock.waited("10000000030-5", deadline, enqueued, 10000001031.5, 0)[0] is True
    assert clock.waited(b"10000000030-0", deadline, enqueued, 10000000000.0, 0) == (False, 0.0)
    assert clock.waited(b"10000000030-0", deadline, enqueued, None, 1e10 + 1001) == (True, 1001)
    assert clock.redis_ms([b"1700000000", b"250500"]) == 1_700_000_000_250.5
    assert clock.redis_ms((1700000000, 0)) == 1_700_000_000_000
    assert clock.redis_ms(None) is None and clock.entry_ms(b"x-1") is None


def test_redis_time_is_carried_on_while_its_node_is_away() -> None:
    """Without a ``TIME`` reply (the node failing over), the last offset from this host's
    clock estimates it: a worker 2 s ahead fell back to its own clock and dropped requests."""
    told = clock.RedisClock()
    assert told.now_ms(None, 5_000.0) is None  # never read: the caller's fallback
    assert told.now_ms([b"3", b"0"], 5_000.0) == 3_000.0  # this host 2 s ahead
    assert told.now_ms(None, 5_250.0) == 3_250.0
    assert told.now_ms(ConnectionError("away"), 6_000.0) == 4_000.0


def test_processes_with_skewed_clocks_answer_in_time_and_stay_live(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The gateway and log bin 6 s ahead of the machine, real 8 s ahead, canary 6 s behind:
    real answers every request (it dropped them all as expired, 2 s past a 1 s timeout), both
    bins report queue waits of a few ms (+2 s and -12 s), and both workers are live to
    readiness and the admin API (the gateway's clock put real and then both past the 5 s
    heartbeat timeout)."""
    schedule = Schedule(real_deadline_ms=500, timeout_ms=1000)
    skew = tmp_path_factory.mktemp("skew")
    env = {**skewed_env(skew, 6000), "RDV_ADMIN_TOKEN": TOKEN}
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, schedule,
                       port=port_in_range(), **env) as system:  # fmt: skip
        start_skewed_worker(system, "real", 8000, skew)
        start_skewed_worker(system, "canary", -6000, skew)
        time.sleep(1.5)  # a heartbeat or more of each, as readiness would see them
        rows = [b["instances"][0] for b in bodies(100)]
        answers = [system.predict(b) for b in [*bodies(8), {"instances": rows}]]
        assert [a.status_code for a in answers] == [200] * 9, answers[-1].text
        assert {a.json()["model"]["role"] for a in answers} == {"real"}
        assert system.http.get("/readyz").status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        view = system.http.get(f"/admin/deployments/{DEMO_DEPLOYMENT}", headers=auth).json()
        assert view["live_workers"] == {"real": 1, "canary": 1}
        stream = names.decisions_stream(DEMO_DEPLOYMENT)
        wait_until(lambda: len(decode_entries(system.r.xrange(stream))) >= 9, 10, "decisions")
        waits = [out.queue_ms for d in decode_entries(system.r.xrange(stream))
                 for out in d.outputs.values()]  # fmt: skip
        assert waits and all(0 <= q < 500 for q in waits), waits


def test_a_time_reply_that_came_late_to_the_worker_does_not_turn_the_clock_back() -> None:
    """A worker stopped 7 s got its read's reply on resuming, with Redis's time from before the
    stop, and scored an entry whose deadline had passed (a helper's probe): the reply's time
    is judged against the host's clock carried on since the last one."""
    told = clock.RedisClock()
    assert told.now_ms([b"100", b"0"], 1_000.0) == 100_000.0
    assert told.now_ms([b"100", b"50000"], 1_060.0) == 100_060.0  # paused meanwhile: now
    assert told.now_ms([b"100", b"120000"], 1_120.0) == 100_120.0  # on time again: as told
    assert told.now_ms([b"101", b"0"], 1_500.0) == 101_000.0  # Redis's clock stepped ahead
