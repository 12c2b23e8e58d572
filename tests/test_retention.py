"""Input-stream trimming follows the slowest consumer group (real Redis)."""

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from rendezvous import names
from rendezvous.bus.retention import (
    forget_gone_consumers,
    safe_floor,
    trim_behind_groups,
    trim_input_stream,
)
from rendezvous.envelope import RequestEnvelope

DEP = "trim-dep"
STREAM = names.input_stream(DEP)


def fill(r: redis.Redis, n: int) -> list[bytes]:
    return [r.xadd(STREAM, {b"d": str(i).encode()}) for i in range(n)]


def consume(r: redis.Redis, group: str, ids: list[bytes]) -> None:
    """``group`` reads every entry and acks ``ids``."""
    r.xreadgroup(group, "c", {STREAM: ">"}, count=10_000)
    r.xack(STREAM, group, *ids)


def add_requests(r: redis.Redis, n: int) -> list[bytes]:
    """``n`` real request envelopes, as the gateway appends them."""
    x = np.ones((1, 3), np.float32)
    envelopes = [RequestEnvelope(f"q{i}", DEP, "rdv:reply:{g}", 0, 0.0, b"{}", x, "fs")
                 for i in range(n)]  # fmt: skip
    return [r.xadd(STREAM, env.encode()) for env in envelopes]


def test_nothing_is_trimmed_past_an_unarchived_entry(r: redis.Redis) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:real", id="0")
    ids = fill(r, 300)
    # real has read and acked everything; the log bin read 100 but acked only the first 40.
    for _i, _f in r.xreadgroup("model:real", "w", {STREAM: ">"}, count=1000)[0][1]:
        pass
    r.xack(STREAM, "model:real", *ids)
    r.xreadgroup("logbin", "lb", {STREAM: ">"}, count=100)
    r.xack(STREAM, "logbin", *ids[:40])
    assert safe_floor(r, STREAM) == ids[40].decode()
    trim_input_stream(r, DEP)
    remaining = [e for e, _ in r.xrange(STREAM)]
    assert set(ids[40:]) <= set(remaining), "an entry the log bin still holds was trimmed"


def test_trims_once_every_group_is_done(r: redis.Redis) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    ids = fill(r, 2000)
    r.xreadgroup("logbin", "lb", {STREAM: ">"}, count=5000)
    r.xack(STREAM, "logbin", *ids)
    removed = trim_input_stream(r, DEP)
    assert removed > 1000  # approximate trimming keeps at most a macro-node's worth
    assert r.xlen(STREAM) < 1000
    assert ids[-1] in [e for e, _ in r.xrange(STREAM)]


def test_a_group_that_read_nothing_protects_everything(r: redis.Redis) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:canary", id="0")
    ids = fill(r, 500)
    r.xreadgroup("logbin", "lb", {STREAM: ">"}, count=1000)
    r.xack(STREAM, "logbin", *ids)
    assert trim_input_stream(r, DEP) == 0
    assert r.xlen(STREAM) == 500


def test_missing_stream_or_no_groups_is_left_alone(r: redis.Redis) -> None:
    assert trim_input_stream(r, DEP) == 0
    fill(r, 10)
    assert trim_input_stream(r, DEP) == 0 and r.xlen(STREAM) == 10


def test_the_log_bin_trims_behind_every_group(r: redis.Redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from models.archive import ArchiveReader, SegmentWriter
    from models.logbin import LogBin

    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:real", id="0")
    ids = add_requests(r, 1500)
    writer = SegmentWriter(tmp_path)
    logbin = LogBin(r, writer, consumer="lb", deployments=[DEP], trim_interval_s=1e-9)
    logbin.drain()
    assert r.xlen(STREAM) == 1500, "model:real has read nothing yet: nothing may go"
    r.xreadgroup("model:real", "w", {STREAM: ">"}, count=5000)
    r.xack(STREAM, "model:real", *ids)
    logbin.step(block_ms=None)
    writer.close()
    assert logbin.stats.trimmed > 0 and r.xlen(STREAM) < 1500
    assert len(list(ArchiveReader(tmp_path).records(DEP))) == 1500


def test_a_model_role_that_lags_past_the_bound_is_moved_forward_and_counted(
    r: redis.Redis,
) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:real", id="0")
    r.xgroup_create(STREAM, "model:canary", id="0")
    ids = fill(r, 300)
    for group in ("logbin", "model:real"):
        r.xreadgroup(group, "c", {STREAM: ">"}, count=1000)
        r.xack(STREAM, group, *ids)
    r.xreadgroup("model:canary", "dead", {STREAM: ">"}, count=50)  # read, never acked: died
    assert trim_input_stream(r, DEP, max_role_lag=1000) == 0  # within the bound: held
    assert r.xlen(STREAM) == 300
    assert trim_input_stream(r, DEP, max_role_lag=100) == 299
    assert r.xlen(STREAM) == 1
    assert r.xpending(STREAM, "model:canary")["pending"] == 0
    assert r.hget(names.skipped_key(DEP), "canary") == b"299"
    # The worker that comes back resumes at its group's position: the next entry.
    fresh = r.xadd(STREAM, {b"d": b"new"})
    ((_, entries),) = r.xreadgroup("model:canary", "back", {STREAM: ">"}, count=10)
    assert [e for e, _ in entries] == [fresh]


def test_the_log_bins_position_is_never_moved_however_far_behind(r: redis.Redis) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:real", id="0")
    ids = fill(r, 300)
    r.xreadgroup("model:real", "c", {STREAM: ">"}, count=1000)
    r.xack(STREAM, "model:real", *ids)
    assert trim_input_stream(r, DEP, max_role_lag=100) == 0
    assert r.xlen(STREAM) == 300 and not r.exists(names.skipped_key(DEP))


def test_a_stream_is_settled_once_no_group_is_behind_the_log_bin(r: redis.Redis) -> None:
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:real", id="0")
    ids = fill(r, 300)
    consume(r, "logbin", ids)
    assert trim_behind_groups(r, DEP)[1] is False  # real still needs all of it: trim again
    consume(r, "model:real", ids)
    assert trim_behind_groups(r, DEP)[1] is True  # only the log bin's reading on frees more
    assert trim_behind_groups(r, "no-such-dep") == (0, True)


def test_the_log_bin_trims_a_stream_until_settled_and_an_idle_one_rarely(
    r: redis.Redis,
    tmp_path,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """Twenty idle deployments trimmed every second were most of an idle log bin's round
    trips: a stream is trimmed every interval only from an archive until it is settled."""
    import rendezvous.bus.retention as retention_module
    from models.archive import SegmentWriter
    from models.logbin import LogBin

    idle_dep = "trim-idle"
    idle = names.input_stream(idle_dep)
    for stream in (STREAM, idle):
        r.xgroup_create(stream, "logbin", id="0", mkstream=True)
        r.xgroup_create(stream, "model:real", id="0")
    ids = add_requests(r, 300)
    trims: list[str] = []
    real_trim = retention_module.trim_behind_groups

    def counted(client, dep, lag, stream):  # type: ignore[no-untyped-def]
        trims.append(dep)
        return real_trim(client, dep, lag, stream)

    monkeypatch.setattr(retention_module, "trim_behind_groups", counted)
    logbin = LogBin(r, SegmentWriter(tmp_path), consumer="lb", deployments=[DEP, idle_dep],
                    trim_interval_s=1e-9)  # fmt: skip
    logbin.drain()  # archives DEP's entries; the first trim takes every stream
    assert sorted(set(trims)) == [DEP, idle_dep]
    trims.clear()
    logbin.step(block_ms=None)
    assert trims == [DEP]  # real is behind the log bin on DEP: trimmed again; idle is not
    consume(r, "model:real", ids)
    logbin.step(block_ms=None)
    assert r.xlen(STREAM) < 300  # what real freed went at once
    trims.clear()
    for _ in range(3):
        logbin.step(block_ms=None)
    assert trims == []  # settled: nothing more to free until the next archive
    logbin.close()


def ack_all(client: redis.Redis, group: str, consumer: str | None = None) -> None:
    """``group`` acks everything pending (of ``consumer`` alone if given)."""
    pending = client.xpending_range(STREAM, group, "-", "+", 1000, consumername=consumer)
    if pending:
        client.xack(STREAM, group, *[p["message_id"] for p in pending])


@pytest.mark.parametrize("bus", ["single", "cluster"])
def test_consumers_long_gone_are_forgotten_and_no_pending_entry_goes_with_them(
    bus: str, request: pytest.FixtureRequest
) -> None:
    """A worker restarted under a new name leaves its old consumer in every group: it goes
    once idle long enough with nothing pending; one holding entries stays (they are claimed
    from it), and so do a live reader and the caller's own name. On a cluster the script runs
    on the stream's node."""
    client: redis.Redis = request.getfixturevalue("r" if bus == "single" else "rc")
    for group in ("logbin", "model:real"):
        client.xgroup_create(STREAM, group, id="0", mkstream=True)
    fill(client, 5)
    client.xreadgroup("model:real", "real-host-11", {STREAM: ">"}, count=2)
    ack_all(client, "model:real")
    client.xreadgroup("model:real", "real-host-12", {STREAM: ">"}, count=1)  # died holding it
    client.xreadgroup("logbin", "logbin-old-host", {STREAM: ">"}, count=4)
    ack_all(client, "logbin")
    client.xreadgroup("logbin", "me", {STREAM: ">"}, count=1)
    ack_all(client, "logbin")
    time.sleep(0.25)
    client.xreadgroup("model:real", "real-host-13", {STREAM: ">"}, count=1)  # alive
    ack_all(client, "model:real", "real-host-13")

    assert forget_gone_consumers(client, STREAM, idle_ms=60_000) == 0  # none gone that long
    assert forget_gone_consumers(client, STREAM, idle_ms=200, spare="me") == 2

    def consumers(group: str) -> set[str]:
        return {c["name"].decode() for c in client.xinfo_consumers(STREAM, group)}

    assert consumers("model:real") == {"real-host-12", "real-host-13"}
    assert consumers("logbin") == {"me"}
    assert client.xpending(STREAM, "model:real")["pending"] == 1  # still someone's to claim
    assert forget_gone_consumers(client, "rdv:{no-such}:in", idle_ms=0) == 0
    client.set("rdv:{not-a-stream}", b"x")
    assert forget_gone_consumers(client, "rdv:{not-a-stream}", idle_ms=0) == 0


def test_the_log_bin_forgets_gone_consumers_of_the_streams_it_archives(
    r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rendezvous.bus.retention as retention_module
    from models.archive import SegmentWriter
    from models.logbin import LogBin

    monkeypatch.setattr(retention_module, "GONE_CONSUMER_MS", 100)
    r.xgroup_create(STREAM, "logbin", id="0", mkstream=True)
    r.xgroup_create(STREAM, "model:canary", id="0")
    add_requests(r, 3)
    r.xreadgroup("model:canary", "canary-old-7", {STREAM: ">"}, count=10)
    ack_all(r, "model:canary")
    time.sleep(0.2)
    logbin = LogBin(r, SegmentWriter(tmp_path), consumer="lb", deployments=[DEP],
                    trim_interval_s=1e-9)  # fmt: skip
    logbin.drain()
    logbin.close()
    assert [c["name"] for c in r.xinfo_consumers(STREAM, "model:canary")] == []
    assert [c["name"] for c in r.xinfo_consumers(STREAM, "logbin")] == [b"lb"]
