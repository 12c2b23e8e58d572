"""A consumer's streams set aside while their node is lost: the others are read on."""

from __future__ import annotations

import pytest
import redis

from rendezvous.bus import aside
from rendezvous.bus.aside import SetAside


def test_a_lost_nodes_streams_read_as_empty_and_are_left_out_until_their_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(aside.time, "monotonic", lambda: now[0])
    streams = ["a", "b", "c"]
    replies: list[object] = [[b"read"], redis.ConnectionError("gone"), ValueError("bad")]
    held = SetAside("test")
    out, lost = held.tolerate(replies, [["a"], ["b"], ["c"]], streams)
    # Only a node's failure sets a stream aside; the command's own error stays to be raised.
    assert out[0] == [b"read"] and out[1] is None and out[2] is replies[2]
    assert lost == ["b"] and "b" in held and held.reachable(streams) == ["a", "c"]
    assert held.wait_s(None) == pytest.approx(aside.ASIDE_S)
    assert held.wait_s(100) == pytest.approx(0.1)  # at most a blocking read's time
    now[0] += aside.ASIDE_S
    assert held.reachable(streams) == streams and not held


def test_when_every_stream_is_lost_the_errors_stay_to_fail_the_step() -> None:
    held = SetAside("test")
    failure = redis.TimeoutError("slow")
    out, lost = held.tolerate([failure, failure], [["a"], ["b", "c"]], ["a", "b", "c"])
    assert out == [failure, failure] and lost == [] and not held


def test_a_stream_still_lost_is_logged_once_every_ten_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    monkeypatch.setattr(aside.time, "monotonic", lambda: now[0])
    held = SetAside("test")
    lost = [redis.ConnectionError("gone"), [b"read"]]
    for _ in range(5):  # tried again every ASIDE_S, lost again each time
        held.tolerate(lost, [["a"], ["b"]], ["a", "b"])
        now[0] += aside.ASIDE_S
    assert len([r for r in caplog.records if "does not answer" in r.message]) == 1
    now[0] += aside.WARN_EVERY_S
    held.tolerate(lost, [["a"], ["b"]], ["a", "b"])
    assert len([r for r in caplog.records if "does not answer" in r.message]) == 2
