"""The rendezvous matcher against a real Redis server: results written to its reply stream
resolve the waiting request by the schedule, and one decision record follows."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException
from test_realtime_first import a_long_step

from gateway.dataplane.mailbox import DuplicateRequest
from gateway.dataplane.matcher import Rendezvous
from rendezvous import names
from rendezvous.bus.appender import StreamAppender
from rendezvous.bus.async_router import Router
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.envelope import ModelResult, encode_results
from rendezvous.schedule import Schedule

DEP = "dep"
SCHEDULE = Schedule(real_deadline_ms=60, timeout_ms=400, fallbacks=("canary",), grace_ms=150)
PATIENT = Schedule(real_deadline_ms=3000, timeout_ms=6000, fallbacks=("canary",), grace_ms=150)
"""For an answer that must come *before* real's deadline: a shared 2-core host can stall the
test process past 60 ms (a CI run read 218 ms), and then the deadline fires first, rightly."""
ROLES = ["real", "canary"]
_bg: set[asyncio.Task[None]] = set()


@pytest.fixture
async def rdv(r: redis.Redis, redis_url: str) -> AsyncIterator[Rendezvous]:
    client = aioredis.Redis.from_url(redis_url)
    reader = Router(aioredis.Redis.from_url(redis_url), timeout_s=3.0)
    writer = Router(client, timeout_s=2.0)
    matcher = Rendezvous(client, reader, names.reply_stream("t-gw"), StreamAppender(writer))
    await matcher.start()
    yield matcher
    await matcher.stop()
    await matcher.records.decisions.close()
    await writer.close()
    await client.aclose()
    await reader.client.aclose()


def result(
    rid: str, role: str, p1: float, version: int = 1, error: str | None = None
) -> ModelResult:
    proba = np.array([[1 - p1, p1]], dtype=np.float32)
    return ModelResult(rid, DEP, "m", version, role, [int(p1 >= 0.5)], proba, [0, 1], 0.2, 0.1,
                       error=error)  # fmt: skip


async def send(client: aioredis.Redis, res: ModelResult, delay_s: float = 0.0) -> None:
    await asyncio.sleep(delay_s)
    await client.xadd(names.reply_stream("t-gw"), res.encode())


async def decisions(r: redis.Redis, count: int, timeout_s: float = 2.0) -> list[DecisionRecord]:
    stream = names.decisions_stream(DEP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = r.xrange(stream)
        if len(entries) >= count:
            return decode_entries(entries)
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} decision records, found {len(r.xrange(stream))}")


async def test_real_answers_and_record_has_divergence(rdv: Rendezvous, r: redis.Redis) -> None:
    mb = rdv.open("a", DEP, PATIENT, ROLES)
    _bg.add(asyncio.create_task(send(rdv.client, result("a", "real", 0.9, version=2))))
    _bg.add(asyncio.create_task(send(rdv.client, result("a", "canary", 0.3), delay_s=0.02)))
    answer = await rdv.wait(mb)
    assert answer.outcome == "real" and answer.result is not None
    assert answer.result.version == 2 and answer.elapsed_ms < PATIENT.real_deadline_ms
    [rec] = await decisions(r, 1)
    assert rec.request_id == "a" and rec.outcome == "real" and rec.missing == ()
    assert rec.outputs["real"].probabilities == [[pytest.approx(0.1), pytest.approx(0.9)]]
    div = rec.divergence
    assert div is not None and div is rec.divergences["canary"]
    assert div.disagreements == 1 and div.abs_diff_mean == pytest.approx(0.6, abs=1e-6)
    assert rec.pair("canary") == ("m:2", "m:1")
    assert rec.to_dict()["divergence"]["pair"] == ["m:2", "m:1"]
    assert "a" not in rdv.mailboxes


async def test_the_decision_hook_gets_the_record_that_was_written(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    seen: list[DecisionRecord] = []
    rdv.records.on_decision = seen.append
    mb = rdv.open("h", DEP, SCHEDULE, ROLES)
    await send(rdv.client, result("h", "real", 0.9, version=2))
    await send(rdv.client, result("h", "canary", 0.3))
    await rdv.wait(mb)
    [rec] = await decisions(r, 1)
    assert seen == [rec]
    assert rec.answered_after_ms > 0 and rec.outputs["real"].arrived_ms is not None


async def test_canary_answers_after_real_misses_its_deadline(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    mb = rdv.open("b", DEP, SCHEDULE, ROLES)
    _bg.add(asyncio.create_task(send(rdv.client, result("b", "canary", 0.2))))
    answer = await rdv.wait(mb)
    assert answer.outcome == "fallback" and answer.role == "canary"
    assert SCHEDULE.real_deadline_ms <= answer.elapsed_ms < SCHEDULE.timeout_ms
    [rec] = await decisions(r, 1)
    assert rec.missing == ("real",) and rec.chosen_role == "canary"
    assert rec.divergence is None


async def test_real_arriving_late_but_within_grace_is_recorded(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    mb = rdv.open("c", DEP, SCHEDULE, ROLES)
    _bg.add(asyncio.create_task(send(rdv.client, result("c", "canary", 0.2))))
    _bg.add(asyncio.create_task(send(rdv.client, result("c", "real", 0.4), delay_s=0.1)))
    answer = await rdv.wait(mb)
    assert answer.role == "canary"
    [rec] = await decisions(r, 1)
    assert rec.missing == () and rec.divergence is not None
    assert rec.divergence.disagreements == 0


async def test_results_in_the_grace_period_keep_its_one_timer_and_it_still_closes(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    """Each shadow result after the answer leaves the grace period's end where it was: it
    re-arms nothing (a new timer per result cost the gateway ~2 us a bin), and the record is
    still written at that end when a bin never answers."""
    roles = ["real", "canary", "c1", "c2"]
    mb = rdv.open("g", DEP, SCHEDULE, roles)
    await send(rdv.client, result("g", "real", 0.9))
    answer = await rdv.wait(mb)
    grace_timer = mb.timer
    assert grace_timer is not None and not mb.closed
    await send(rdv.client, result("g", "canary", 0.8))
    await send(rdv.client, result("g", "c1", 0.7))
    for _ in range(400):  # the reply reader files them within milliseconds
        if len(mb.results) == 3:
            break
        await asyncio.sleep(0.005)
    assert set(mb.results) == {"real", "canary", "c1"}
    assert mb.timer is grace_timer and not mb.closed
    [rec] = await decisions(r, 1)
    assert rec.missing == ("c2",) and set(rec.divergences) == {"canary", "c1"}
    closed_after_ms = (time.perf_counter() - mb.started) * 1000
    assert closed_after_ms >= answer.elapsed_ms + SCHEDULE.grace_ms


async def test_timeout_when_nobody_answers(rdv: Rendezvous, r: redis.Redis) -> None:
    t0 = time.perf_counter()
    answer = await rdv.wait(rdv.open("d", DEP, SCHEDULE, ROLES))
    waited_ms = (time.perf_counter() - t0) * 1000
    assert answer.outcome == "timeout" and answer.result is None
    assert SCHEDULE.timeout_ms <= waited_ms < SCHEDULE.timeout_ms + 200
    [rec] = await decisions(r, 1)
    assert rec.outcome == "timeout" and sorted(rec.missing) == ["canary", "real"]


async def test_the_reply_reader_rides_out_any_failure_and_recreates_a_lost_stream(
    rdv: Rendezvous, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What redis-py's cluster client raises while no node covers a slot (no ``RedisError``)
    and a bug alike: the reader logs, pauses and reads on. A reader that stopped would time
    out every request of its gateway."""
    failures: list[Exception] = [RedisClusterException("no node covers the slot"),
                                 RuntimeError("a bug")]  # fmt: skip
    execute = rdv.reader.execute

    async def failing_twice(commands, **kwargs):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop(0)
        return await execute(commands, **kwargs)

    monkeypatch.setattr(rdv.reader, "execute", failing_twice)
    stream = names.reply_stream("t-gw")
    r.delete(stream)  # lost meanwhile: a failover before it was replicated, a restart
    for _ in range(250):
        if r.exists(stream):
            break
        await asyncio.sleep(0.02)
    assert not failures
    [(_, fields)] = r.xrange(stream)
    assert b"hello" in fields and 0 < r.ttl(stream) <= 600  # recreated by the reader
    mb = rdv.open("rides", DEP, PATIENT, ROLES)
    await send(rdv.client, result("rides", "real", 0.9))
    answer = await rdv.wait(mb)
    assert answer.outcome == "real" and answer.elapsed_ms < PATIENT.real_deadline_ms


async def test_only_a_redis_failure_of_the_reader_counts_as_redis_failing(
    rdv: Rendezvous, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_failed_ms`` turns a timed-out request's 504 into a 503 ("Redis failed while it
    waited"): a bug in the reader is no Redis failure, and does not say so. ``read_failure``
    (what ``/readyz`` reads) says why the reader fails while it does, whatever the cause, and
    clears with the next read that succeeds."""
    failures: list[Exception] = [RuntimeError("a bug"), redis.ConnectionError("gone")]
    execute = rdv.reader.execute
    seen: list[float] = []
    failing_then: list[str | None] = []

    async def failing(commands, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(rdv.read_failed_ms)
        failing_then.append(rdv.read_failure)
        if failures:
            raise failures.pop(0)
        return await execute(commands, **kwargs)

    monkeypatch.setattr(rdv.reader, "execute", failing)
    for _ in range(250):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.02)
    assert seen[0] == 0 and seen[1] == 0, "after the bug: not a Redis failure"
    assert seen[2] > 0, "after the connection error: Redis failed"
    assert failing_then[:3] == [None, "RuntimeError: a bug", "ConnectionError: gone"]
    for _ in range(300):  # the read after the failures returns within its block time
        if rdv.read_failure is None:
            break
        await asyncio.sleep(0.02)
    assert rdv.read_failure is None
    # The outage ends with that read, not at its last failure: a request that began in the
    # backoff after it may have lost its answer as well (a helper's cluster probe: jobs and
    # predicts begun then got a 504, which a job keeps for good, instead of a 503)
    assert rdv.read_failed_ms > seen[2]


async def test_failed_real_falls_back_at_once(rdv: Rendezvous, r: redis.Redis) -> None:
    mb = rdv.open("e", DEP, PATIENT, ROLES)
    await send(rdv.client, result("e", "canary", 0.2))
    await send(rdv.client, result("e", "real", 0.0, error="model failed"))
    answer = await rdv.wait(mb)
    assert answer.role == "canary" and answer.reason.startswith("real failed")
    assert answer.elapsed_ms < PATIENT.real_deadline_ms / 2
    [rec] = await decisions(r, 1)
    assert rec.failed == ["real"] and rec.outputs["real"].error == "model failed"


async def test_every_role_that_may_answer_failing_ends_the_wait_with_a_502(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    """It waited for the timeout (400 ms here, 1 s by default) and answered 504, though no
    answer could come; now at once, a 502 naming each model's failure."""
    from gateway.dataplane.failures import NoAnswer, problem_of

    mb = rdv.open("g", DEP, SCHEDULE, ROLES)
    await send(rdv.client, result("g", "real", 0.0, error="model failed: boom"))
    await send(rdv.client, result("g", "canary", 0.0, error="model answered a non-finite "
                                  "probability (row 0)"))  # fmt: skip
    answer = await rdv.wait(mb)
    assert answer.failed and answer.result is None
    assert answer.elapsed_ms < SCHEDULE.timeout_ms / 2
    problem = problem_of(NoAnswer("g", answer))
    assert problem is not None and problem.status == 502
    assert problem.detail == ("every model that may answer failed on the request: canary: "
                              "model answered a non-finite probability (row 0); real: model "
                              "failed: boom")  # fmt: skip
    [rec] = await decisions(r, 1)
    assert rec.outcome == "timeout" and sorted(rec.failed) == ["canary", "real"]


async def test_a_failed_real_without_the_fallback_it_names_ends_the_wait_at_once(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    """A deployment made without a canary keeps the default fallback ``canary``: a real that
    failed left its callers waiting out the timeout for a 504 (a helper's probe)."""
    mb = rdv.open("h", DEP, SCHEDULE, ["real"])
    await send(rdv.client, result("h", "real", 0.0, error="model failed: boom"))
    answer = await rdv.wait(mb)
    assert answer.failed and answer.result is None
    assert answer.elapsed_ms < SCHEDULE.timeout_ms / 2
    [rec] = await decisions(r, 1)
    assert rec.failed == ["real"]


async def test_duplicate_in_flight_id_is_refused_and_late_results_counted(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    told: list[str] = []
    rdv.on_late = lambda late: told.append(late.role)
    mb = rdv.open("f", DEP, SCHEDULE, ["real"])
    with pytest.raises(DuplicateRequest):
        rdv.open("f", DEP, SCHEDULE, ["real"])
    await send(rdv.client, result("f", "real", 0.9))
    await rdv.wait(mb)
    await decisions(r, 1)
    await send(rdv.client, result("f", "real", 0.9))
    for _ in range(50):
        if rdv.late_results:
            break
        await asyncio.sleep(0.02)
    assert rdv.late_results == 1
    assert told == ["real"]  # what the metrics count, without waiting for a scrape


async def test_many_concurrent_requests_each_get_their_own_answer(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    ids = [f"m{i}" for i in range(200)]
    # PATIENT: what is checked is the matching, not the timing (a fresh-clone CI run timed out
    # at 473 ms of SCHEDULE's 400 while another test worker loaded the 2-core host)
    boxes = [rdv.open(i, DEP, PATIENT, ["real"]) for i in ids]
    pipe = rdv.client.pipeline(transaction=False)
    for n, rid in enumerate(ids):
        pipe.xadd(names.reply_stream("t-gw"), result(rid, "real", n / 200).encode())
    await pipe.execute()
    answers = await asyncio.gather(*(rdv.wait(b) for b in boxes))
    for n, (rid, ans) in enumerate(zip(ids, answers, strict=True)):
        assert ans.result is not None and ans.result.request_id == rid
        assert float(ans.result.probabilities[0, 1]) == pytest.approx(n / 200)
    assert len(await decisions(r, 200)) == 200


async def test_results_batched_in_one_entry_resolve_each_request_and_bad_ones_are_counted(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    ids = [f"b{i}" for i in range(4)]
    boxes = [rdv.open(i, DEP, SCHEDULE, ["real"]) for i in ids]
    fields = encode_results([result(rid, "real", n / 4) for n, rid in enumerate(ids)])
    doc = msgpack.unpackb(fields[b"r"], raw=False)
    doc["results"].insert(1, {"id": "b1", "no": "other field"})
    await rdv.client.xadd(names.reply_stream("t-gw"), {b"r": msgpack.packb(doc)})
    await rdv.client.xadd(names.reply_stream("t-gw"), {b"r": b"not msgpack \xc1"})
    answers = await asyncio.gather(*(rdv.wait(b) for b in boxes))
    assert [a.result.request_id for a in answers if a.result is not None] == ids
    for _ in range(50):
        if rdv.bad_results == 2:
            break
        await asyncio.sleep(0.02)
    assert rdv.bad_results == 2


async def test_a_caller_that_goes_away_leaks_no_mailbox(rdv: Rendezvous, r: redis.Redis) -> None:
    short = Schedule(real_deadline_ms=20, timeout_ms=150, fallbacks=("canary",), grace_ms=50)
    mb = rdv.open("gone", DEP, short, ROLES)
    waiter = asyncio.create_task(rdv.wait(mb))
    await asyncio.sleep(0.01)
    waiter.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await waiter
    [rec] = await decisions(r, 1)
    assert rec.outcome == "timeout" and "gone" not in rdv.mailboxes


async def test_an_envelope_that_cannot_be_published_fails_its_wait_without_a_record(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    dead_bus = StreamAppender(
        Router(aioredis.Redis.from_url(f"redis://127.0.0.1:{nobody}/0"), timeout_s=1.0)
    )
    mb = rdv.open("lost", DEP, SCHEDULE, ROLES)

    def unpublished(exc: Exception) -> None:
        rdv.fail(mb, RuntimeError(f"unpublished: {exc}"))

    dead_bus.append_nowait(names.input_stream(DEP), {b"m": b"x"}, on_error=unpublished)
    with pytest.raises(RuntimeError, match=r"unpublished: .*connect"):
        await rdv.wait(mb)
    assert "lost" not in rdv.mailboxes
    await asyncio.sleep(SCHEDULE.timeout_ms / 1000 + 0.1)  # no timer is left to write one
    assert r.xlen(names.decisions_stream(DEP)) == 0


async def test_large_records_are_kept_in_fewer_entries_than_the_count_cap(
    r: redis.Redis, redis_url: str
) -> None:
    """The decisions stream keeps ``decisions_maxlen`` records, or fewer when they are large:
    with a byte cap, 600 records of 64 rows stay within about that many bytes (XADD's
    approximate trim may keep up to a listpack node, 100 entries, more)."""
    client = aioredis.Redis.from_url(redis_url)
    reader = Router(aioredis.Redis.from_url(redis_url), timeout_s=3.0)
    writer = Router(client, timeout_s=2.0)
    max_bytes = 300_000
    matcher = Rendezvous(client, reader, names.reply_stream("t-gw"), StreamAppender(writer),
                         decisions_maxlen=50_000, decisions_max_bytes=max_bytes)  # fmt: skip
    await matcher.start()
    try:
        rows = 64
        for start in range(0, 600, 100):
            ids = [f"big{i}" for i in range(start, start + 100)]
            boxes = [matcher.open(i, DEP, SCHEDULE, ["real"]) for i in ids]
            pipe = client.pipeline(transaction=False)
            for rid in ids:
                proba = np.tile(np.array([[0.25, 0.75]], np.float32), (rows, 1))
                res = ModelResult(rid, DEP, "m", 1, "real", [1] * rows, proba, [0, 1], 0.2, 0.1)
                pipe.xadd(names.reply_stream("t-gw"), res.encode())
            await pipe.execute()
            await asyncio.gather(*(matcher.wait(b) for b in boxes))
    finally:
        await stop_all(matcher, writer, client, reader)
    entries = r.xrange(names.decisions_stream(DEP))
    record_bytes = len(entries[-1][1][b"m"])
    cap = matcher.records.cap.maxlen(DEP, record_bytes)  # all the same size: the mean is it
    assert cap == max_bytes // (record_bytes + 64)
    assert 100 <= cap < 600
    assert cap <= len(entries) <= cap + 100, (len(entries), cap, record_bytes)
    assert entries[-1][1][b"m"] and decode_entries(entries[-1:])[0].request_id == "big599"


async def test_a_jobs_decision_record_is_written_between_realtime_requests_and_at_a_stop(
    rdv: Rendezvous, r: redis.Redis
) -> None:
    """A 1,000-row job's record took up to 20 ms to write on a loaded host, in the turn that
    closed it, ahead of realtime work (``RealtimeFirst``)."""
    first = rdv.records.realtime_first
    first.yield_ratio, first.yield_s = 1000.0, 5.0
    await first.turn()
    a_long_step(0.02)
    first.started()  # a realtime predict in flight
    job = rdv.open("job-1", DEP, PATIENT, ROLES)
    job.background = True
    realtime = rdv.open("rt-1", DEP, PATIENT, ROLES)
    for rid in ("job-1", "rt-1"):
        await send(rdv.client, result(rid, "real", 0.9))
        await send(rdv.client, result(rid, "canary", 0.2))
    await rdv.wait(job)
    await rdv.wait(realtime)
    await decisions(r, 1)
    await asyncio.sleep(0.2)
    assert [rec.request_id for rec in await decisions(r, 1)] == ["rt-1"]
    first.ended()
    assert [rec.request_id for rec in await decisions(r, 2)] == ["rt-1", "job-1"]
    # A stop writes the jobs' records still waiting, whatever realtime does.
    first.started()
    job = rdv.open("job-2", DEP, PATIENT, ROLES)
    job.background = True
    await send(rdv.client, result("job-2", "real", 0.9))
    await send(rdv.client, result("job-2", "canary", 0.2))
    await rdv.wait(job)
    await asyncio.sleep(0.1)
    await rdv.stop()
    recs = await decisions(r, 3)
    assert [rec.request_id for rec in recs] == ["rt-1", "job-1", "job-2"]


async def test_a_start_while_redis_refuses_writes_serves_once_it_takes_them(
    r: redis.Redis, redis_url: str
) -> None:
    """A gateway started while Redis refused writes (its disk full: MISCONF; at its memory
    limit) failed its start, and rdv serve's backoff kept it away up to 30 s after Redis took
    writes again (a helper's disk probe). It starts; its reader makes the reply stream once
    Redis takes writes, and answers from then on."""
    client = aioredis.Redis.from_url(redis_url)
    reader = Router(aioredis.Redis.from_url(redis_url), timeout_s=3.0)
    writer = Router(client, timeout_s=2.0)
    reply_to = names.reply_stream("t-refused")
    matcher = Rendezvous(client, reader, reply_to, StreamAppender(writer))
    r.delete(reply_to)
    r.config_set("maxmemory", 1)  # noeviction: every write refused
    try:
        await matcher.start()
        await asyncio.sleep(0.2)
        assert matcher.read_failure is not None and "maxmemory" in matcher.read_failure
    finally:
        r.config_set("maxmemory", 0)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if r.exists(reply_to):
                break
            await asyncio.sleep(0.02)
        assert r.exists(reply_to)
        mb = matcher.open("z", DEP, PATIENT, ROLES)
        await client.xadd(reply_to, result("z", "real", 0.9).encode())
        answer = await asyncio.wait_for(matcher.wait(mb), 3.0)
        assert answer.outcome == "real"
    finally:
        await stop_all(matcher, writer, client, reader)


async def stop_all(
    matcher: Rendezvous, writer: Router, client: aioredis.Redis, reader: Router
) -> None:
    await matcher.stop()
    await matcher.records.decisions.close()
    await writer.close()
    await client.aclose()
    await reader.client.aclose()
