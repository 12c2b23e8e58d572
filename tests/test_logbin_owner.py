"""One log bin a consumer name (real Redis): two bins under one name archived each other's
pending entries twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from models.archive import SegmentWriter
from models.logbin import LogBin
from models.name_owner import OWNER_TTL_S, NameTaken, owner_key, take_name

pytestmark = pytest.mark.integration


def test_a_name_in_use_is_refused_a_dead_holders_is_waited_out(r: redis.Redis) -> None:
    take_name(r, "logbin-h", "first")
    with pytest.raises(NameTaken, match=r"logbin-h.*own --consumer"):
        take_name(r, "logbin-h", "second", wait_s=0.3)
    r.pexpire(owner_key("logbin-h"), 300)  # its holder died: the hold runs out unrenewed
    t0 = time.monotonic()
    take_name(r, "logbin-h", "second", wait_s=2.0)
    assert 0.2 < time.monotonic() - t0 < 2.0 and r.get(owner_key("logbin-h")) == b"second"


def test_a_running_bin_renews_its_hold_and_lets_go_at_a_clean_stop(
    r: redis.Redis, tmp_path: Path
) -> None:
    take_name(r, "lb-own", "me")
    logbin = LogBin(r, SegmentWriter(tmp_path), consumer="lb-own", deployments=[],
                    owner_token="me", heartbeat_s=0.05)  # fmt: skip
    r.pexpire(owner_key("lb-own"), 500)
    time.sleep(0.1)
    logbin.step(block_ms=None)  # its counters are due: the hold rides with them
    assert r.pttl(owner_key("lb-own")) > 0.8 * OWNER_TTL_S * 1000
    logbin.close()
    assert r.get(owner_key("lb-own")) is None
    take_name(r, "lb-own", "next", wait_s=0.1)  # free at once


def test_a_bin_whose_name_another_took_stops_and_leaves_it_to_the_other(
    r: redis.Redis, tmp_path: Path
) -> None:
    """A bin paused past its hold (a host frozen, cut off) while a successor started under its
    name: its renewal, a plain SET, took the name back on resuming, and both ran under one name
    for good, renewing it in turns (a helper's multi-host probe). It stops instead."""
    import threading

    take_name(r, "lb-lost", "me")
    logbin = LogBin(r, SegmentWriter(tmp_path), consumer="lb-lost", deployments=[],
                    owner_token="me", heartbeat_s=0.05)  # fmt: skip
    r.set(owner_key("lb-lost"), "successor", px=5000)  # the hold lapsed; another took it
    stop = threading.Event()
    runner = threading.Thread(target=logbin.run, args=(stop,), daemon=True)
    runner.start()
    runner.join(5)  # it stops by itself
    stopped_alone = not runner.is_alive()
    stop.set()
    runner.join(5)
    assert r.get(owner_key("lb-lost")) == b"successor"
    assert stopped_alone and logbin.name_lost is not None
    assert "lb-lost" in str(logbin.name_lost)


def test_a_start_while_redis_refuses_writes_waits_for_them(r: redis.Redis) -> None:
    """A log bin or worker host started while Redis refused writes (its disk full: MISCONF;
    at its memory limit: OOM) exited 1, and rdv serve's backoff kept it away up to 30 s after
    Redis took writes again (a helper's disk probe). It waits instead, as its loop would."""
    import threading

    r.delete(owner_key("lb-refused"))
    r.config_set("maxmemory", 1)  # noeviction: every write refused
    thawed = threading.Timer(0.6, lambda: r.config_set("maxmemory", 0))
    thawed.start()
    try:
        t0 = time.monotonic()
        take_name(r, "lb-refused", "me", wait_s=0.1)
        assert time.monotonic() - t0 >= 0.5
        assert r.get(owner_key("lb-refused")) == b"me"
    finally:
        thawed.join()
        r.config_set("maxmemory", 0)
