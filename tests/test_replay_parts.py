"""The parts of replay and export one by one: time and position parsing (no server), the
report store and the label lookup on a real Redis Cluster (every pipeline in one slot)."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
import redis

from models.archive_slice import SliceError, parse_time, positions_from, sid_key
from models.labels import labels_for
from models.replay_report import new_report
from models.replay_store import LeaseLost, ReplayStore, new_replay_id, replay_report_for
from rendezvous import names

DEP = "credit"


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1764583200000, 1764583200000.0),
        ("1764583200000", 1764583200000.0),
        ("1764583200000.4114", 1764583200000.4114),  # a metadata's to_ms, as it was printed
        ("2025-12-01T10:00:00Z", 1764583200000.0),
        ("2025-12-01T10:00:00", 1764583200000.0),
        ("2025-12-01T11:00:00+01:00", 1764583200000.0),
    ],
)
def test_times_are_iso_or_epoch_ms(value: object, ms: float) -> None:
    assert parse_time(value, "from") == ms


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "²",
        "",
        -1,
        1e300,
        True,
        None,
        [1],
        "0001-01-01T00:00:00+14:00",
        "1.2.3",
        "12.",
        "99999999999999999999",
        10**400,  # float() overflowed: a 500 (a probe)
        float("nan"),
    ],
)
def test_a_bad_time_is_refused_by_name(value: object) -> None:
    with pytest.raises(SliceError, match=r"^to: "):
        parse_time(value, "to")


def test_positions_read_back_and_bad_ones_say_why() -> None:
    doc = {"rdv:{credit}:in": {"first": "5-0", "last": "12-3", "records": 4}}
    (span,) = positions_from(doc).values()
    assert (span.first, span.last, span.records) == ("5-0", "12-3", 4)
    assert sid_key("12-3") > sid_key("9-9")  # numeric, not text, order
    for bad, says in [
        ({}, "expected"),
        ({"s": {"first": "9-0", "last": "1-0"}}, "after last"),
        ({"s": {"first": "x", "last": "1-0"}}, "not a stream id"),
        ({"s": {"first": 1, "last": "1-0"}}, "must be stream ids"),
        ({"s": {"first": "1-0", "last": "2-0", "records": "many"}}, None),
        # a probe's: taken with 202, then the replay failed on math.floor(nan) with a traceback
        ({"s": {"first": "1-0", "last": "2-0", "to_ms": float("nan")}}, "to_ms: nan is out of"),
        ({"s": {"first": "1-0", "last": "2-0", "from_ms": -math.inf}}, "from_ms: -inf is out of"),
        ({"s": {"first": "1-0", "last": "2-0", "from_ms": 10**400}}, "from_ms: 1000"),  # a 500
        ({"s": {"first": "1-0", "last": "2-0", "from_ms": 1e300}}, "out of range"),
        ({"s": {"first": "1-0", "last": "2-0", "from_ms": 9e12, "to_ms": 1e12}}, "is after to_ms"),
    ]:
        if says is None:
            assert positions_from(bad)["s"].records == 0
            continue
        with pytest.raises(SliceError, match=says):
            positions_from(bad)
    # found by hand: Redis refused these ids only once the replay ran (it failed with Redis's
    # words), and a stream of another deployment selected nothing (it failed empty)
    for bad_id in ("99999999999999999999999-0", "18446744073709551616-0", "1_000-0", "+5-0"):
        with pytest.raises(SliceError, match="not a stream id"):
            sid_key(bad_id)
    assert sid_key("18446744073709551615-7") == (2**64 - 1, 7) and sid_key("5") == (5, 0)
    own = {names.input_stream("credit", k, n): {"first": "1-0", "last": "2-0"}
           for n in (1, 3, 64) for k in range(n)}  # fmt: skip
    assert set(positions_from(own, "credit")) == set(own)
    for other in ("rdv:{debit}:in", "rdv:{credit#3.2.0}:in", "rdv:{credit}:decisions"):
        with pytest.raises(SliceError, match="is not an input stream of credit"):
            positions_from({other: {"first": "1-0", "last": "2-0"}}, "credit")


def test_reports_are_stored_leased_and_found_on_a_cluster(rc: redis.RedisCluster) -> None:
    store = ReplayStore(rc)
    rid = new_replay_id()
    report = new_report(rid, DEP, "m", 3, {"last": 5}, None, 64, 1000.0)
    store.create(DEP, report, {}, "me")
    assert store.get(DEP, rid)["state"] == "running"  # type: ignore[index]
    assert not store.take_lease(DEP, rid, "other")
    store.request_cancel(DEP, rid)
    assert store.checkpoint(DEP, report, {"done": 1}, "me") is True
    # a runner taken for dead (its lease lapsed, the replay resumed: another holds it) saves
    # nothing over the one running now; it kept writing, and both ran (a helper's probe)
    with pytest.raises(LeaseLost):
        store.checkpoint(DEP, {**report, "phase": "stale"}, {"done": 99}, "other")
    with pytest.raises(LeaseLost):
        store.finish(DEP, {**report, "state": "failed"}, {"done": 99}, "other")
    assert store.stored(DEP, rid)[1] == {"done": 1}  # type: ignore[index]
    assert replay_report_for(rc, DEP, 3) is None  # not done yet
    store.finish(DEP, {**report, "state": "done"}, {"done": 5}, "me")
    assert replay_report_for(rc, DEP, 3)["id"] == rid  # type: ignore[index]
    assert replay_report_for(rc, DEP, 3, model="other") is None
    assert store.stored(DEP, rid)[1] == {"done": 5}  # type: ignore[index]
    assert [r["id"] for r in store.list(DEP)] == [rid]
    # A running report whose runner's lease lapsed reads as interrupted.
    lost = new_replay_id()
    store.create(DEP, new_report(lost, DEP, "m", 3, {}, None, 64, 2000.0), {}, "gone")
    rc.delete(names.replay_lock_key(DEP, lost))
    seen = store.get(DEP, lost)
    assert seen is not None and seen["state"] == "interrupted"
    assert store.take_lease(DEP, lost, "me")


def test_labels_are_read_from_every_bucket_on_a_cluster(rc: redis.RedisCluster) -> None:
    assert labels_for(rc, DEP, ["a", "b"]) == {}
    rc.hset(f"rdv:{{{DEP}}}:labels:1", mapping={"a": "1", "b": json.dumps({"label": 0})})
    later = {
        "a": msgpack.packb([[0], None, 1.0, 5]),  # the feedback route's form
        "m": msgpack.packb([[1, 0], None, 1.0, 5]),
        "j": msgpack.packb([None, False, 1.0, 5]),  # a judgement, no class
        "c": "junk",
        "t": "true",
    }
    rc.hset(f"rdv:{{{DEP}}}:labels:2", mapping=later)
    assert labels_for(rc, DEP, ["a", "b", "c", "d", "m", "j", "t"]) == {
        "a": (0,),  # the later bucket's label replaced the first
        "b": (0,),
        "m": (1, 0),
    }


def test_a_slice_names_each_partition_and_reads_back_the_same_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from models.archive import ArchiveReader, SegmentWriter
    from models.archive_slice import read, resolve

    other = names.input_stream(DEP, 1, 2)
    writer = SegmentWriter(tmp_path, max_bytes=200)  # several segments
    records = []
    for i in range(60):
        stream = other if i % 3 == 0 else ""
        rec = {"stream_id": f"{1000 + i}-0", "request_id": f"r{i}", "enqueued_ms": 1000 + i,
               "features": [[float(i)]], **({"stream": stream} if stream else {})}  # fmt: skip
        records.append(rec)
    for k in range(0, 60, 7):
        writer.append_batch(DEP, records[k : k + 7])
    writer.append_batch(DEP, records[10:12])  # redelivered after a crash: read once
    writer.close()
    reader = ArchiveReader(tmp_path)
    assert len(reader.segments(DEP)) > 2
    by_time = resolve(reader, DEP, from_ms=1010, to_ms=1029)
    assert {s: (p.first, p.last, p.records) for s, p in by_time.items()} == {
        names.input_stream(DEP): ("1010-0", "1029-0", 14),
        other: ("1012-0", "1027-0", 6),
    }
    assert [r["request_id"] for r in read(reader, DEP, by_time)] == [f"r{i}" for i in range(10, 30)]
    last = resolve(reader, DEP, last=5, to_ms=2000)
    assert sum(p.records for p in last.values()) == 5
    assert [r["request_id"] for r in read(reader, DEP, last)] == [f"r{i}" for i in range(55, 60)]
    assert resolve(reader, DEP, from_ms=5000) == {}
    with pytest.raises(SliceError, match="after"):
        resolve(reader, DEP, from_ms=2, to_ms=1)


def test_a_window_takes_its_last_millisecond_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Request times have fractions: ``--to`` at the millisecond an export printed as a
    record's ``time`` (852 for 852.013) left that record out, so windows laid end to end by
    the millisecond dropped the records between them (a helper's probe)."""
    from models.archive import ArchiveReader, SegmentWriter
    from models.archive_slice import resolve

    writer = SegmentWriter(tmp_path)
    times = [851.999, 852.0, 852.013, 852.999, 853.0]
    writer.append_batch(DEP, [{"stream_id": f"{i + 1}-0", "request_id": f"r{i}", "enqueued_ms": t,
                               "features": [[0.0]]} for i, t in enumerate(times)])  # fmt: skip
    writer.close()
    reader = ArchiveReader(tmp_path)
    first = resolve(reader, DEP, to_ms=852)
    second = resolve(reader, DEP, from_ms=853, to_ms=853)
    assert first[names.input_stream(DEP)].records == 4
    assert second[names.input_stream(DEP)].records == 1


def test_a_window_by_time_holds_only_its_times_whatever_the_stream_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A request stamped after a window's end can reach Redis before one stamped inside it (a
    Redis stall): by its stream ids alone the window held it, and so did the next window (93
    of 4,293 requests in two windows of a helper's probe). Read back, by the positions too."""
    from models.archive import ArchiveReader, SegmentWriter
    from models.archive_slice import positions_from, positions_json, read, resolve

    writer = SegmentWriter(tmp_path)
    times = [100.0, 150.0, 300.0, 160.0, 250.0]  # the third stamped late, appended early
    writer.append_batch(DEP, [{"stream_id": f"{i + 1}-0", "request_id": f"r{i}", "enqueued_ms": t,
                               "features": [[0.0]]} for i, t in enumerate(times)])  # fmt: skip
    writer.close()
    reader = ArchiveReader(tmp_path)
    first = resolve(reader, DEP, from_ms=0, to_ms=200)
    second = resolve(reader, DEP, from_ms=201, to_ms=400)
    assert [r["request_id"] for r in read(reader, DEP, first)] == ["r0", "r1", "r3"]
    assert [r["request_id"] for r in read(reader, DEP, second)] == ["r2", "r4"]
    assert first[names.input_stream(DEP)].records == 3
    again = positions_from(positions_json(first))  # as an export's metadata names them
    assert [r["request_id"] for r in read(reader, DEP, again)] == ["r0", "r1", "r3"]


def test_segments_last_written_long_before_the_slice_are_not_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import time

    from models.archive import ArchiveReader, SegmentWriter
    from models.archive_slice import resolve

    now_ms = time.time() * 1000
    writer = SegmentWriter(tmp_path, max_bytes=1)  # a segment per batch
    for i in range(3):
        sid = f"{int(now_ms) + i}-0"
        rec = {"stream_id": sid, "request_id": f"r{i}", "enqueued_ms": now_ms + i,
               "features": [[1.0]]}  # fmt: skip
        writer.append_batch(DEP, [rec])
    writer.close()
    reader = ArchiveReader(tmp_path)
    first = reader.segments(DEP)[0].path
    hour_ago = time.time() - 3600
    os.utime(first, (hour_ago, hour_ago))  # as if written an hour ago: skipped for a recent slice
    recent = resolve(reader, DEP, from_ms=now_ms - 1000)
    assert sum(p.records for p in recent.values()) == 2
    os.utime(first)  # written now, as it really was: read again
    everything = resolve(reader, DEP, from_ms=now_ms - 1000)
    assert sum(p.records for p in everything.values()) == 3


def test_the_largest_divergence_is_a_requests_as_the_mean_and_histogram_are() -> None:
    """The report's ``js_max`` was the worst single row while its mean and histogram are per
    request (a request's distance its rows' mean), as the README says (a helper's probe)."""
    import numpy as np

    from models.replay_report import Given, Tally, count_request, report_view

    tally = Tally()
    given = Given("real", [0, 0], [0, 0], [[1.0, 0.0], [1.0, 0.0]])
    ours = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # one row opposite: JS 1
    count_request(tally, "r1", np.array([0, 1]), ours, given, None)
    report = new_report("r", "d", "m", 1, {}, None, 256, 0.0)
    figures = report_view(report, tally)["divergence"]
    assert figures["js_mean"] == pytest.approx(0.5, abs=1e-6)
    assert figures["js_max"] == pytest.approx(0.5, abs=1e-6)
