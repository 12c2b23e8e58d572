"""The cluster state kept for a scrape that cannot read Redis (gateway.observability.kept_state):
served as the newest any gateway process of the port read, so that counters read from Redis do
not go back and forth as scrapes land on one process or the other during a stall."""

from __future__ import annotations

from pathlib import Path

from gateway.observability.kept_state import KEPT_S, KeptState


def age_of(served: bytes) -> float | None:
    for line in served.decode().splitlines():
        if line.startswith("rdv_state_age_seconds "):
            return float(line.split()[1])
    return None


def test_a_process_that_cannot_read_serves_the_newest_state_any_process_read(
    tmp_path: Path,
) -> None:
    """Found by a helper's metrics probe: with two gateway processes, a stall's scrapes read
    rdv_worker_scored_total 1360 (the process scraped 4 s before), 1330 (the one scraped 42 s
    before), 1360: a counter that fell, a reset to Prometheus's rate() and increase()."""
    first, second = KeptState(str(tmp_path)), KeptState(str(tmp_path))
    second.read(b"rdv_worker_scored_total 1330.0\n", now=100.0)
    first.read(b"rdv_worker_scored_total 1360.0\n", now=138.0)
    second.missed()  # Redis stalls: the next scrape lands on the other process
    served = second.served(now=142.0)
    assert b"rdv_worker_scored_total 1360.0" in served
    assert b"1330" not in served
    assert age_of(served) == 4.0
    assert b"rdv_state_read_ok 0.0" in served


def test_an_older_shared_state_never_replaces_a_newer_own_one(tmp_path: Path) -> None:
    first, second = KeptState(str(tmp_path)), KeptState(str(tmp_path))
    first.read(b"old\n", now=10.0)
    second.read(b"new\n", now=20.0)
    (tmp_path / "kept-state").write_bytes(b"5.0\nolder\n")
    second.missed()
    assert second.served(now=21.0).startswith(b"new\n")


def test_without_a_shared_folder_each_process_keeps_its_own(tmp_path: Path) -> None:
    kept = KeptState()
    kept.read(b"mine\n", now=1.0)
    kept.missed()
    assert kept.served(now=2.0).startswith(b"mine\n")
    assert not kept.served(now=2.0 + KEPT_S).startswith(b"mine\n")  # past the bound: gone
