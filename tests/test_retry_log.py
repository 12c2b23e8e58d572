"""A failure met at every retry is said when it starts, when it turns into another, once every
``repeat_s`` while it lasts (with how long and how many tries), and when it ends."""

from __future__ import annotations

import logging

import pytest
import redis

from rendezvous.retry_log import KINDS_SAID, RetryLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watched(caplog: pytest.LogCaptureFixture, what: str) -> tuple[RetryLog, Clock]:
    """A retry log of ``what`` on a clock the test moves, its lines captured."""
    caplog.set_level(logging.INFO, "t")
    clock = Clock()
    return RetryLog(logging.getLogger("t"), what, repeat_s=30, clock=clock), clock


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return lines


def test_a_failure_at_every_try_is_said_at_its_start_every_repeat_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retry, clock = watched(caplog, "reader")
    retry.succeeded()  # nothing failed: nothing to say
    assert said(caplog) == [] and not retry.failing
    for _ in range(120):  # 30 s at four tries a second
        retry.failed("redis unavailable (refused)", 0.25)
        clock.now += 0.25
    assert said(caplog) == ["reader: redis unavailable (refused); retrying in 0.25s"]
    retry.failed("redis unavailable (refused)", 0.25)  # the 121st, 30 s after the first
    assert said(caplog) == [
        "reader: still failing after 30s (121 tries): redis unavailable (refused); retrying in "
        "0.25s"
    ]
    assert retry.failing
    clock.now += 1.5
    retry.succeeded()
    retry.succeeded()
    assert said(caplog) == ["reader: working again after 31.5s (121 failed tries)"]
    assert not retry.failing
    retry.failed("timeout", None)  # a new spell: said at once, its tries counted afresh
    clock.now += 2
    retry.succeeded()
    assert said(caplog) == ["reader: timeout", "reader: working again after 2.0s (1 failed try)"]


def test_a_failure_that_comes_and_goes_is_counted_not_said_as_a_pair_a_flip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers at a partial memory limit (some writes refused, some not) said "failing" and
    "working again" at every flip. The same failure back within ``repeat_s`` of its end is
    counted; the log says it at most every ``repeat_s``, and its last word is the truth."""
    retry, clock = watched(caplog, "worker")
    oom = "Redis refuses: OOM command not allowed"
    retry.failed(oom)
    clock.now += 1
    retry.succeeded()
    assert said(caplog) == [f"worker: {oom}", "worker: working again after 1.0s (1 failed try)"]
    for _ in range(10):  # a flip every 2 s for 20 s: nothing said
        clock.now += 1
        retry.failed(oom)
        clock.now += 1
        retry.succeeded()
    assert said(caplog) == [] and not retry.failing
    clock.now += 11  # 31 s after the last line: the next working try says so
    retry.succeeded()
    assert said(caplog) == ["worker: working again (it failed and recovered 10 times in 31s)"]
    clock.now += 5  # flapping again, and failing at the repeat: said so, then its end
    retry.failed(oom)
    clock.now += 1
    retry.succeeded()
    clock.now += 25
    retry.failed(oom)
    assert said(caplog) == [f"worker: failing again (2 times in 31s): {oom}"] and retry.failing
    clock.now += 1
    retry.succeeded()
    assert said(caplog) == []
    clock.now += 30
    retry.succeeded()
    assert said(caplog) == ["worker: working again (it failed and recovered 2 times in 62s)"]
    clock.now += 40  # long after: a failure is a new spell, said at once
    retry.failed(oom)
    assert said(caplog) == [f"worker: {oom}"]


def test_another_kind_of_failure_is_said_at_once_and_a_flood_of_kinds_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retry, clock = watched(caplog, "jobs")
    for _ in range(3):  # two kinds in turn: each said once
        retry.failed("connection refused")
        retry.failed("connection reset")
    assert said(caplog) == ["jobs: connection refused", "jobs: connection reset"]
    for n in range(400):  # an id in every message: past KINDS_SAID, only the repeats
        retry.failed(f"entry {n} unreadable")
        clock.now += 0.1
    lines = said(caplog)
    assert len(lines) == KINDS_SAID - 2 + 1, lines  # the kinds left, then one repeat at 30 s
    assert lines[-1].startswith("jobs: still failing after 3"), lines[-1]
    assert lines[-1].endswith(" unreadable") and "tries)" in lines[-1]


def test_the_level_and_the_traceback_are_the_callers(caplog: pytest.LogCaptureFixture) -> None:
    retry, _clock = watched(caplog, "refresh")
    try:
        raise KeyError("x")
    except KeyError as exc:
        retry.failed(f"failed ({exc!r})", level=logging.ERROR, exc_info=exc)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == "refresh: failed (KeyError('x'))"


async def test_the_gateways_flush_loops_say_an_outage_once_not_at_every_flush(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome store's and the drift feed's flushes logged every refused write, four a
    second a process (a helper's probe, Redis refusing writes on a full disk: 120 lines a
    process in 30 s). Each now says an outage once, and when it ends."""
    import asyncio

    import redis

    from gateway.dataplane.outcome_store import OutcomeStore
    from gateway.observability.drift_feed import DriftFeed

    caplog.set_level(logging.INFO)
    outcomes = OutcomeStore(None, retention_s=3600, bucket_s=60, max_bytes=10**9,  # type: ignore[arg-type]
                            flush_s=0.01)  # fmt: skip
    feed = DriftFeed(None, None, interval_s=0.01)  # type: ignore[arg-type]
    tries = {"outcomes": 0, "feed": 0}
    done = {name: asyncio.Event() for name in tries}

    def refusing(name: str, until: int) -> object:
        async def flush() -> int:
            tries[name] += 1
            if tries[name] <= until:
                raise redis.ConnectionError("MISCONF Redis cannot write to its disk")
            if tries[name] >= until + 10:
                done[name].set()
            return 1  # written: what says Redis works again

        return flush

    monkeypatch.setattr(outcomes, "flush", refusing("outcomes", 30))
    monkeypatch.setattr(feed, "flush", refusing("feed", 30))
    loops = [asyncio.create_task(outcomes.run()), asyncio.create_task(feed.run())]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in done.values())), 30)
    for loop in loops:
        loop.cancel()
    lines = [r.getMessage() for r in caplog.records]
    for what in ("feedback: writing outcomes", "drift: writing sketches"):
        mine = [line for line in lines if line.startswith(what)]
        assert len(mine) == 2, mine  # the start, the end: not 30 lines
        assert "MISCONF" in mine[0] and "working again after" in mine[1] and "30 failed" in mine[1]


def test_a_third_party_loggers_repeats_are_held_back_and_counted() -> None:
    """redis-py's cluster client logs each failed topology refresh, twice a second while a
    cluster refuses the user (a helper's probe): once per spell, then how many were held."""
    from rendezvous.retry_log import OncePerSpell

    now = [0.0]
    spell = OncePerSpell(repeat_s=30.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("redis.asyncio.cluster", logging.ERROR, __file__, 1, msg,
                                 None, None)  # fmt: skip

    said = []
    for t in range(0, 61):  # two a second for a minute
        for half in (0.0, 0.5):
            now[0] = t + half
            rec = record("Topology refresh failed")
            if spell.filter(rec):
                said.append(rec.getMessage())
    assert said[0] == "Topology refresh failed" and len(said) == 3, said
    assert said[1] == "Topology refresh failed (59 more like it in the last 30 s)"
    other = record("another message")
    assert spell.filter(other)  # each template its own


def test_a_burst_is_said_then_held_back_and_counted() -> None:
    """The HTTP guard's refusal line: a client looping on an 18-byte bad request wrote 9 bytes
    of log for each byte it sent (a helper's probe). At most ``burst`` a spell, then a count."""
    from rendezvous.retry_log import OncePerSpell

    now = [0.0]
    spell = OncePerSpell(repeat_s=60.0, clock=lambda: now[0], burst=3)
    said = []
    for t in range(0, 121):  # ten a second for two minutes
        for tenth in range(10):
            now[0] = t + tenth / 10
            rec = logging.LogRecord("g", logging.WARNING, __file__, 1, "refused %d", (400,), None)
            if spell.filter(rec):
                said.append(rec.getMessage())
    assert said[:3] == ["refused 400"] * 3 and len(said) == 9, said
    assert said[3] == "refused 400 (597 more like it in the last 60 s)"


def test_a_loops_line_names_a_refusal_for_a_while_not_an_unreachable_redis() -> None:
    """The drift monitor, live accuracy and the deployments' refresh said "cannot reach Redis"
    of a Redis that answered and refused writes (its disk full; a helper's disk probe)."""
    from rendezvous.bus.failures import said

    disk = redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ...")
    piped = redis.ResponseError("Command # 1 (EVAL ...) of pipeline caused error: OOM command "
                                "not allowed when used memory > 'maxmemory'.")  # fmt: skip
    assert said(disk).startswith("Redis refuses: Redis cannot write its data to disk")
    assert said(piped).startswith("Redis refuses: Redis is at its memory limit")
    assert said(redis.ConnectionError("Error 111")) == "cannot reach Redis (Error 111)"
