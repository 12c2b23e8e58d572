"""The log bin against a real Redis server: archive, ack after fsync, recovery, stop."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from models.archive import ArchiveReader, SegmentWriter
from models.logbin import LogBin, LogBinStats
from processes import open_files_under
from rendezvous import names
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.envelope import RequestEnvelope

pytestmark = pytest.mark.integration


class FailingWriter(SegmentWriter):
    """Data reaches the page cache but fsync fails, as on a dying disk."""

    def _fsync(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(5, "injected fsync failure")
        super()._fsync(fd)


class AckLostLogBin(LogBin):
    """Crashes once between the fsync and the ack."""

    lose_next_ack = True

    def _ack(self, ids: dict[str, list[bytes]]) -> None:
        if self.lose_next_ack:
            self.lose_next_ack = False
            raise redis.ConnectionError("injected: connection lost before the ack")
        super()._ack(ids)


def _sid(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _envelope(i: int, deployment: str = "demo") -> RequestEnvelope:
    rng = np.random.default_rng(i)
    return RequestEnvelope(
        request_id=f"req-{i}",
        deployment=deployment,
        reply_to="rdv:reply:{gw1}",
        deadline_ms=1_700_000_001_000 + i,
        enqueued_ms=1_700_000_000_000.25 + i,
        raw=f'{{"instances": [[{i}, 0.5]]}}'.encode(),
        features=rng.normal(size=(2, 3)).astype(np.float32),
        spec_version="spec-1",
    )


def _publish(
    r: redis.Redis, n: int, deployment: str = "demo", start: int = 0
) -> dict[str, RequestEnvelope]:
    """``n`` requests (numbered from ``start``: each request is published once)."""
    sent = {}
    for i in range(start, start + n):
        env = _envelope(i, deployment)
        entry_id = r.xadd(names.input_stream(deployment), env.encode())  # type: ignore[arg-type]
        sent[_sid(entry_id)] = env
    return sent


def _logbin(r: redis.Redis, writer: SegmentWriter, **kw: Any) -> LogBin:
    kw.setdefault("consumer", "logbin-1")
    kw.setdefault("deployments", ["demo"])
    return LogBin(r, writer, **kw)


def _pending(r: redis.Redis, deployment: str = "demo") -> int:
    return int(r.xpending(names.input_stream(deployment), names.LOGBIN_GROUP)["pending"])


def test_drain_archives_every_request(r: redis.Redis, data_dir: Path) -> None:
    sent = _publish(r, 30)
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, batch_size=8)
    assert logbin.drain() == 30
    writer.close()
    assert _pending(r) == 0
    assert logbin.stats.records == 30 and logbin.stats.batches == 4
    records = list(ArchiveReader(data_dir).records("demo"))
    assert [rec["stream_id"] for rec in records] == list(sent)
    for rec in records:
        env = sent[rec["stream_id"]]
        assert rec["request_id"] == env.request_id
        assert rec["spec_version"] == env.spec_version
        assert rec["enqueued_ms"] == env.enqueued_ms
        assert rec["raw"] == {"instances": [[int(env.request_id[4:]), 0.5]]}
        np.testing.assert_array_equal(np.array(rec["features"], dtype=np.float32), env.features)


def test_one_read_serves_several_deployments(r: redis.Redis, data_dir: Path) -> None:
    _publish(r, 3, "alpha")
    _publish(r, 4, "beta")
    writer = SegmentWriter(data_dir)
    assert _logbin(r, writer, deployments=["alpha", "beta"]).drain() == 7
    writer.close()
    reader = ArchiveReader(data_dir)
    assert len(list(reader.records("alpha"))) == 3
    assert len(list(reader.records("beta"))) == 4


def test_new_deployments_are_picked_up(r: redis.Redis, data_dir: Path) -> None:
    deployments = ["alpha"]
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, deployments=lambda: list(deployments), refresh_s=0.0)
    _publish(r, 2, "alpha")
    assert logbin.drain() == 2
    _publish(r, 3, "beta")
    deployments.append("beta")
    assert logbin.drain() == 3
    assert open_files_under(data_dir / "alpha") == open_files_under(data_dir / "beta") == 1
    deployments.remove("alpha")  # deleted and purged: its segment is closed (it stayed open)
    logbin.drain()
    assert (open_files_under(data_dir / "alpha"), open_files_under(data_dir / "beta")) == (0, 1)
    writer.close()
    assert ArchiveReader(data_dir).deployments() == ["alpha", "beta"]


def test_nothing_is_acked_when_fsync_fails(r: redis.Redis, data_dir: Path) -> None:
    _publish(r, 5)
    with pytest.raises(OSError, match="injected"):
        _logbin(r, FailingWriter(data_dir)).drain()
    assert _pending(r) == 5
    # The same consumer restarts with a healthy disk: its own pending entries come first.
    writer = SegmentWriter(data_dir)
    assert _logbin(r, writer).drain() == 5
    writer.close()
    assert _pending(r) == 0
    reader = ArchiveReader(data_dir)
    # The failed batch was cut from its segment, which it left empty: removed, not kept.
    assert [rec["request_id"] for rec in reader.records("demo", dedupe=False)] == [
        f"req-{i}" for i in range(5)]  # fmt: skip
    assert [s.size_bytes > 0 for s in reader.segments("demo")] == [True]


def test_entries_of_a_dead_consumer_are_reclaimed(r: redis.Redis, data_dir: Path) -> None:
    _publish(r, 5)
    with pytest.raises(OSError):
        _logbin(r, FailingWriter(data_dir), consumer="dead").drain()
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, consumer="alive", claim_idle_ms=0, batch_size=2)
    assert logbin.drain() == 5
    writer.close()
    assert logbin.stats.reclaimed == 5
    assert _pending(r) == 0
    assert len(list(ArchiveReader(data_dir).records("demo"))) == 5


def test_a_lost_ack_redelivers_and_the_reader_dedupes(r: redis.Redis, data_dir: Path) -> None:
    _publish(r, 4)
    writer = SegmentWriter(data_dir)
    logbin = AckLostLogBin(r, writer, consumer="logbin-1", deployments=["demo"])
    with pytest.raises(redis.ConnectionError):
        logbin.drain()
    assert _pending(r) == 4
    logbin.reader.reset()  # what run() does after a Redis error
    assert logbin.drain() == 4
    writer.close()
    assert _pending(r) == 0
    reader = ArchiveReader(data_dir)
    assert len(list(reader.records("demo", dedupe=False))) == 8
    assert [rec["request_id"] for rec in reader.records("demo")] == [f"req-{i}" for i in range(4)]


def test_undecodable_entries_are_archived_and_acked(r: redis.Redis, data_dir: Path) -> None:
    stream = names.input_stream("demo")
    _publish(r, 1)
    bad_ids = [r.xadd(stream, {b"d": b"\xc1garbage"}), r.xadd(stream, {b"x": b"1"})]
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer)
    assert logbin.drain() == 3
    writer.close()
    assert logbin.stats.undecodable == 2
    assert _pending(r) == 0
    records = list(ArchiveReader(data_dir).records("demo"))
    bad = [rec for rec in records if rec.get("undecodable")]
    assert [rec["stream_id"] for rec in bad] == [_sid(i) for i in bad_ids]
    assert all(rec["error"] and rec["deployment"] == "demo" for rec in bad)


def test_archive_lines_keep_raw_and_features_as_sent(r: redis.Redis, data_dir: Path) -> None:
    features = np.array([[17.99, np.nan, np.inf, -np.inf, -0.0, 1e-45]], np.float32)
    raws = [b'{"instances": [[1, 2]]}', '{"name": "caf\u00e9",\n"x": 1}'.encode(), b"\xffno\njson"]
    for i, raw in enumerate(raws):
        env = dataclasses.replace(_envelope(i), raw=raw, features=features)
        r.xadd(names.input_stream("demo"), env.encode())  # type: ignore[arg-type]
    writer = SegmentWriter(data_dir)
    assert _logbin(r, writer).drain() == 3
    writer.close()
    records = list(ArchiveReader(data_dir).records("demo"))
    assert [rec["raw"] for rec in records] == [
        {"instances": [[1, 2]]},
        {"name": "caf\u00e9", "x": 1},
        "\ufffdno\njson",
    ]
    assert [rec.get("raw_text") for rec in records] == [None, None, True]
    for rec in records:
        got = np.asarray(rec["features"], dtype=np.float32)
        assert np.array_equal(got.view(np.uint32), features.view(np.uint32))


def test_run_archives_and_stops_promptly(r: redis.Redis, data_dir: Path) -> None:
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, block_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=logbin.run, args=(stop,), daemon=True)
    thread.start()
    _publish(r, 3)
    deadline = time.monotonic() + 5
    while logbin.stats.records < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logbin.stats.records == 3
    started = time.monotonic()
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert writer._open == {}  # closed on stop
    assert len(list(ArchiveReader(data_dir).records("demo"))) == 3
    assert _pending(r) == 0


def test_run_survives_a_vanished_group(r: redis.Redis, data_dir: Path) -> None:
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, block_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=logbin.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        r.flushdb()  # as after a Redis restart without persistence
        _publish(r, 2)
        deadline = time.monotonic() + 5
        while logbin.stats.records < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=2)
    assert not thread.is_alive()
    assert logbin.stats.records == 2


def test_run_rides_out_a_redis_restart(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """And says so without a line at every try: the outage when it starts, its end."""
    caplog.set_level(logging.INFO, "models.logbin")
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    client = redis.Redis.from_url(server.url, socket_timeout=2.0)
    writer = SegmentWriter(data_dir)
    logbin = _logbin(client, writer, block_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=logbin.run, args=(stop,), daemon=True)
    try:
        sent = _publish(client, 2)
        thread.start()
        _wait_for(lambda: logbin.stats.records >= 2)
        server.kill()
        _wait_for(lambda: logbin.stats.errors >= 8)  # a second and more of tries
        server.start()  # same port, same append-only data
        sent |= _publish(client, 3, start=2)
        _wait_for(lambda: logbin.stats.records >= 5)
        _wait_for(lambda: not logbin.retry_log.failing)
    finally:
        stop.set()
        thread.join(timeout=2)
        client.close()
        server.stop()
    assert not thread.is_alive()
    ids = [rec["stream_id"] for rec in ArchiveReader(data_dir).records("demo")]
    assert sorted(ids) == sorted(sent)
    lines = [r.getMessage() for r in caplog.records if r.name == "models.logbin"]
    down = [line for line in lines if "redis unavailable" in line]
    # each kind of error once (the connection lost, then refused), not each of 8+ tries
    assert 1 <= len(down) <= 3 < logbin.stats.errors, lines
    again = [line for line in lines if "working again after" in line]
    assert len(again) == 1, lines
    tries = re.search(r"\((\d+) failed tries\)", again[0])
    assert tries is not None and int(tries[1]) >= 8, again


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rejects_a_client_that_decodes_responses(redis_url: str, data_dir: Path) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            LogBin(client, SegmentWriter(data_dir), consumer="c", deployments=["demo"])
    finally:
        client.close()


def _published(r: redis.Redis, consumer: str = "logbin-1") -> dict[str, Any] | None:
    raw = r.hget(names.LOGBIN_STATS, consumer)
    return None if raw is None else json.loads(raw)


def test_counters_ride_the_ack_into_the_stats_hash(r: redis.Redis, data_dir: Path) -> None:
    _publish(r, 9)
    r.xadd(names.input_stream("demo"), {b"d": b"\xc1garbage"})
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, batch_size=4, heartbeat_s=0.0)
    before = time.time()
    assert logbin.drain() == 10
    writer.close()
    doc = _published(r)
    assert doc is not None and doc["ts"] >= before
    assert (doc["records"], doc["batches"], doc["undecodable"]) == (10, 3, 1)
    assert doc["bytes_written"] == logbin.stats.bytes_written > 0
    assert set(doc) == {"ts", *dataclasses.asdict(LogBinStats())}


def test_a_clean_stop_removes_the_published_counters(r: redis.Redis, data_dir: Path) -> None:
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, block_ms=50)
    stop = threading.Event()
    thread = threading.Thread(target=logbin.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _publish(r, 3)
        _wait_for(lambda: logbin.stats.records >= 3)
        _wait_for(lambda: (_published(r) or {}).get("records") == 3, timeout_s=5.0)
    finally:
        stop.set()
        thread.join(timeout=2)
    assert not thread.is_alive()
    assert _published(r) is None


def test_a_short_read_makes_the_next_read_wait_and_drain_never_waits(
    r: redis.Redis, data_dir: Path
) -> None:
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, batch_size=3, batch_wait_ms=60_000.0)
    paused: list[float] = []
    logbin._pause = paused.append
    _publish(r, 3)
    assert logbin.step(block_ms=10) == 3  # a full batch: more may be waiting, read at once
    _publish(r, 2)
    assert logbin.step(block_ms=10) == 2
    assert paused == []
    _publish(r, 1)
    assert logbin.step(block_ms=10) == 1  # after the short read: wait first
    [delay_s] = paused
    assert 0 < delay_s <= 60.0
    _publish(r, 2)
    assert logbin.drain() == 2 and len(paused) == 1
    writer.close()
    assert logbin.stats.records == 8 and _pending(r) == 0


class SwitchableWriter(SegmentWriter):
    """fsync fails while ``broken`` is set, as on a full disk that is then cleared."""

    broken = True

    def _fsync(self, fd: int) -> None:
        if self.broken and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(28, "No space left on device")
        super()._fsync(fd)


def test_a_failing_archive_is_published_at_once_and_cleared_by_the_next_write(
    r: redis.Redis, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """...and its end is logged as its start was (the log said when the disk filled, never
    when the archive went on)."""
    caplog.set_level(logging.INFO, logger="models.logbin")
    _publish(r, 5)
    writer = SwitchableWriter(data_dir)
    logbin = _logbin(r, writer)
    with pytest.raises(OSError):
        logbin.step(block_ms=None)
    assert logbin.failed(OSError(28, "No space left on device"), 0.05)
    published = json.loads(r.hget(names.LOGBIN_STATS, "logbin-1"))  # type: ignore[arg-type]
    assert "No space left on device" in published["failing"] and _pending(r) == 5
    writer.broken = False
    logbin.reader.reset()  # what run() does after a failure: our pending entries first
    assert "archiving again" not in caplog.text
    assert logbin.drain() == 5
    assert logbin.stats.failing == "" and _pending(r) == 0
    assert "archiving again (it failed: archive write failed: [Errno 28]" in caplog.text
    writer.close()


class RoomFor(SegmentWriter):
    """A disk with room for ``lines`` records a write: a larger member meets ENOSPC."""

    lines = 3

    def append_batch(self, deployment: str, lines: list[str]) -> int:
        if len(lines) > self.lines:
            raise OSError(28, "No space left on device")
        self.lines -= len(lines)
        return super().append_batch(deployment, lines)


def test_a_disk_with_room_for_part_of_a_batch_takes_that_part(
    r: redis.Redis, data_dir: Path
) -> None:
    """A batch is one member, all or nothing: a disk with less room than a whole batch left
    the archive stuck, retrying the same batch, until a person made more room (found by a
    helper's probe). The part that fits goes, and is acked; the rest waits, pending."""
    sent = _publish(r, 8)
    writer = RoomFor(data_dir)
    logbin = _logbin(r, writer)
    with pytest.raises(OSError):
        logbin.step(block_ms=None)
    assert logbin.stats.records == 3 and _pending(r) == 5
    archived = [rec["request_id"] for rec in ArchiveReader(data_dir).records("demo")]
    assert archived == [e.request_id for e in sent.values()][:3]  # the first ones, in order
    writer.lines = 100  # room again
    logbin.reader.reset()
    assert logbin.drain() == 5 and _pending(r) == 0
    archived = [rec["request_id"] for rec in ArchiveReader(data_dir).records("demo")]
    assert archived == [e.request_id for e in sent.values()]
    writer.close()


def test_redis_refusing_writes_is_no_longer_said_once_it_takes_them_with_nothing_to_archive(
    r: redis.Redis, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle log bin that met Redis refusing writes (at its memory limit; its disk full)
    published "failing: Redis refuses writes" for as long as no request came, after Redis took
    writes again: ``/readyz`` said the archive failing at the memory limit 20 s after it passed
    (a helper's probe). The next counters Redis takes clear it; a refusal that comes back
    within the minute is not logged again."""
    caplog.set_level(logging.INFO, logger="models.logbin")
    writer = SegmentWriter(data_dir)
    logbin = _logbin(r, writer, heartbeat_s=0.0)
    logbin.step(block_ms=None)  # its group made, its counters published
    r.config_set("maxmemory", 1)  # noeviction: the counters' HSET is refused
    try:
        with pytest.raises(redis.ResponseError) as refused:
            logbin.step(block_ms=None)
        assert logbin.failed(refused.value, 0.05)
    finally:
        r.config_set("maxmemory", 0)
    logbin.step(block_ms=None)  # nothing to archive; its counters go through, still failing
    published = json.loads(r.hget(names.LOGBIN_STATS, "logbin-1"))  # type: ignore[arg-type]
    assert "memory limit" in published["failing"], published
    logbin.step(block_ms=None)
    published = json.loads(r.hget(names.LOGBIN_STATS, "logbin-1"))  # type: ignore[arg-type]
    assert published["failing"] == "" and logbin.stats.failing == "", published
    logbin.failed(refused.value, 0.05)  # refused again at once: said once a minute
    assert caplog.text.count("Redis refuses writes") == 1, caplog.text
    writer.close()
