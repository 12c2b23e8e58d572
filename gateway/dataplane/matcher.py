"""The rendezvous: a mailbox per waiting request, filled from this gateway's reply stream.

One task reads the instance's reply stream (one XREAD for many results) and files each result
into its request's mailbox. The schedule decides when a mailbox is answered; after the grace
period (or once every expected bin answered) the mailbox is closed and one decision record is
appended to the deployment's decisions stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.dataplane.decision_cap import DecisionCap
from gateway.dataplane.decision_writer import DecisionWriter
from gateway.dataplane.mailbox import Answer, DuplicateRequest, Mailbox
from gateway.dataplane.realtime_first import RealtimeFirst
from rendezvous import names
from rendezvous.bus.appender import StreamAppender
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import AsyncClient
from rendezvous.bus.failures import REDIS_FAILURES, refused_for_a_while
from rendezvous.bus.routing import Command, raise_first_error
from rendezvous.decision import DecisionRecord
from rendezvous.envelope import EnvelopeError, ModelResult, decode_results
from rendezvous.retry_log import RetryLog
from rendezvous.schedule import Schedule, decide

log = logging.getLogger(__name__)

REPLY_TTL_S = 600
"""A reply stream outlives its gateway by this much at most (refreshed while it lives)."""
KEEP_EVERY_S = 1.0
"""How often the reader refreshes its stream's TTL, making it again if it is gone: the workers
append with ``NOMKSTREAM``, so until then every answer is lost (deleted by hand, or evicted, a
gateway's requests got 504 for up to a minute while ``/readyz`` said 200). One round trip a
second, between blocking reads."""

READ_BACKOFF_MAX_S = 0.25
"""The reply reader's longest pause between failed reads. Requests wait on this reader, so it
looks again soon after Redis is back (an election ends, a restart): a failed read costs next
to nothing, a late look costs every waiting request the rest of the pause."""
_HELLO = b"hello"
_XREAD = (b"XREAD", b"COUNT", b"1024", b"BLOCK", b"1000", b"STREAMS")


class Rendezvous:
    def __init__(
        self,
        client: AsyncClient,
        reader: Router,
        reply_to: str,
        decisions: StreamAppender,
        *,
        decisions_maxlen: int = 50_000,
        decisions_max_bytes: int | None = None,
        on_decision: Callable[[DecisionRecord], None] | None = None,
        on_late: Callable[[ModelResult], None] | None = None,
        realtime_first: RealtimeFirst | None = None,
    ):
        self.client = client
        self.reader = reader
        """Connections of its own: the blocking XREAD holds one, and closing them ends it."""
        self.reply_to = reply_to
        self.records = DecisionWriter(
            decisions,
            DecisionCap(decisions_maxlen, decisions_max_bytes),
            on_decision,
            realtime_first,
        )
        """Writes each closed mailbox's decision record: at most ``decisions_maxlen`` records
        a deployment, fewer when they are large (``decisions_max_bytes``)."""
        self.on_late = on_late
        """Told of each late result (the metrics count it, and its model and queue times)."""
        self.mailboxes: dict[str, Mailbox] = {}
        self.late_results = 0
        self.bad_results = 0
        self._last_id = b"$"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_ttl = 0.0
        self.read_failed_ms = 0.0
        """When the reply reader last failed (epoch ms; 0: never): a request that waited
        through it and got no answer was failed by the bus, not by its models."""
        self.read_failure: str | None = None
        self._redis_down = False
        """The reader's last read failed on Redis (``read_failed_ms`` is set again when a
        read succeeds after it)."""
        """Why the reply reader fails now (None once a read succeeds): while it fails, no
        request of this process can be answered, and ``/readyz`` says so."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._create_stream()
        except Exception as exc:
            # Redis refuses writes for a while (its disk full, at its memory limit): a start
            # now failed ("Application startup failed"), and rdv serve's backoff kept the
            # gateway away up to 30 s after Redis took writes again. The reader makes the
            # stream at its first turn that Redis takes it; until then /readyz and predicts
            # say why (a helper's disk probe).
            if refused_for_a_while(exc) is None:
                raise
            log.warning("reply stream %s: not made yet: %s", self.reply_to, exc)
            self._next_ttl = 0.0
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def reader_task(self) -> asyncio.Task[None] | None:
        """The reply reader, once started: without it no request of this process is answered."""
        return self._task

    async def stop(self) -> None:
        """Stop reading, close every mailbox (writing its record), delete the reply stream."""
        if self._task is not None:
            # Closing the reader's connection fails the blocked XREAD at once; the loop then
            # sees the stop flag.
            self._stopping = True
            await self.reader.close()
            done, _ = await asyncio.wait({self._task}, timeout=2.0)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(self._task, 1.0)
        for mb in list(self.mailboxes.values()):
            if mb.answered is None:
                mb.answered = Answer("timeout", None, None, "gateway is shutting down",
                                     self._elapsed_ms(mb))  # fmt: skip
            if not mb.answer.done():
                mb.answer.set_result(mb.answered)
            self._close(mb, mb.answered)
        await self.records.drain()
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.delete(self.reply_to)

    async def _create_stream(self) -> None:
        """The stream exists before any envelope names it: workers write with NOMKSTREAM."""
        key = self.reply_to.encode()
        entry_id, _ = raise_first_error(await self.reader.execute([
            Command(key, (b"XADD", key, b"*", _HELLO, b"1")), _expire(key)]))  # fmt: skip
        if self._last_id == b"$":
            self._last_id = entry_id
        self._next_ttl = time.monotonic() + KEEP_EVERY_S

    async def _keep_stream(self) -> None:
        """Refresh the stream's TTL; recreate it if it is gone (Redis restarted empty, or a
        failover lost it). On the reader's router like the reads: redis-py's cluster client
        may retry for seconds while a master is being elected, and every request of this
        gateway waits on this loop."""
        (kept,) = raise_first_error(await self.reader.execute([_expire(self.reply_to.encode())]))
        if not kept:
            await self._create_stream()
        self._next_ttl = time.monotonic() + KEEP_EVERY_S

    # -- requests -----------------------------------------------------------------------------

    def open(
        self, request_id: str, deployment: str, schedule: Schedule, expected_roles: list[str]
    ) -> Mailbox:
        """Open the mailbox before the envelope is published: a result may beat the XADD reply."""
        if request_id in self.mailboxes:
            raise DuplicateRequest(
                f"request id {request_id!r} is in use on this gateway (in flight, "
                "or answered and still collecting the other models' results)"
            )
        loop = asyncio.get_running_loop()
        schedule = schedule.among(expected_roles)
        mb = Mailbox(
            request_id=request_id,
            deployment=deployment,
            schedule=schedule,
            expected_roles=expected_roles,
            started=time.perf_counter(),
            started_ms=time.time() * 1000,
            answer=loop.create_future(),
        )
        self.mailboxes[request_id] = mb
        self._arm(mb, schedule.real_deadline_ms)
        return mb

    def fail(self, mb: Mailbox, error: Exception) -> None:
        """Its envelope could not be published: the waiting request gets ``error``, and no
        record is written (nothing was asked), unless a result already answered it."""
        if mb.answered is not None or mb.closed:
            return
        if mb.timer is not None:
            mb.timer.cancel()
        mb.closed = True
        self.mailboxes.pop(mb.request_id, None)
        if not mb.answer.done():
            mb.answer.set_exception(error)

    async def wait(self, mb: Mailbox) -> Answer:
        """A cancelled waiter cancels ``mb.answer``; the matcher skips done futures."""
        return await mb.answer

    # -- the schedule -------------------------------------------------------------------------

    def _elapsed_ms(self, mb: Mailbox) -> float:
        return (time.perf_counter() - mb.started) * 1000

    def _arm(self, mb: Mailbox, at_elapsed_ms: float) -> None:
        if mb.timer is not None:
            if mb.timer_at_ms == at_elapsed_ms:
                return  # already set for then (a cancel and a new timer cost ~2 us)
            mb.timer.cancel()
        delay_s = max(at_elapsed_ms - self._elapsed_ms(mb), 0.0) / 1000
        mb.timer_at_ms = at_elapsed_ms
        mb.timer = asyncio.get_running_loop().call_later(delay_s, self._fire, mb)

    def _fire(self, mb: Mailbox) -> None:
        mb.timer = None  # spent: a re-arm for the same time (it fired a hair early) is new
        self._evaluate(mb)

    def _evaluate(self, mb: Mailbox) -> None:
        if mb.closed:
            return
        elapsed_ms = self._elapsed_ms(mb)
        if mb.answered is None:
            ok = {role for role, r in mb.results.items() if r.ok}
            failed = {role for role, r in mb.results.items() if not r.ok}
            verdict = decide(mb.schedule, ok, failed, elapsed_ms)
            if verdict.answer is not None:
                outcome = verdict.outcome or (
                    "real" if verdict.answer == names.REAL else "fallback"
                )
                mb.answered = Answer(
                    outcome, verdict.answer, mb.results[verdict.answer], verdict.reason,
                    elapsed_ms,
                )  # fmt: skip
            elif verdict.timed_out:
                reason = verdict.reason
                if verdict.failed:
                    reason = "; ".join(f"{role}: {r.error}" for role, r in sorted(
                        mb.results.items()) if not r.ok)  # fmt: skip
                mb.answered = Answer("timeout", None, None, reason, elapsed_ms, verdict.failed)
            else:
                assert verdict.wait_until_ms is not None
                self._arm(mb, verdict.wait_until_ms)
                return
            if not mb.answer.done():
                mb.answer.set_result(mb.answered)
            if mb.answered.outcome == "timeout":
                self._close(mb, mb.answered)
                return
        grace_end_ms = mb.answered.elapsed_ms + mb.schedule.grace_ms
        results, expected = mb.results, mb.expected_roles
        if (len(results) >= len(expected) and all(role in results for role in expected)) or (
            elapsed_ms >= grace_end_ms
        ):
            self._close(mb, mb.answered)
        else:
            self._arm(mb, grace_end_ms)  # timers may fire a hair early: re-arm, never drop

    def _close(self, mb: Mailbox, answered: Answer) -> None:
        """Close the mailbox; its decision record is written at the end of this loop turn,
        with every other mailbox closed in it (every mailbox is answered before it closes)."""
        if mb.closed:
            return
        mb.closed = True
        if mb.timer is not None:
            mb.timer.cancel()
        self.mailboxes.pop(mb.request_id, None)
        self.records.add(mb)

    # -- the reply stream ---------------------------------------------------------------------

    def file(self, result: ModelResult) -> None:
        """Put one result into its mailbox and let the schedule look again."""
        mb = self.mailboxes.get(result.request_id)
        if mb is None or mb.closed:
            self.late_results += 1
            if self.on_late is not None:
                self.on_late(result)
            return
        result.extra["arrived_ms"] = round(self._elapsed_ms(mb), 4)
        mb.results.setdefault(result.role, result)
        self._evaluate(mb)

    async def _read_loop(self) -> None:
        """Read until stopped, whatever fails: a gateway whose reader stopped would answer
        every request with a timeout."""
        backoff_s = 0.05
        retry_log = RetryLog(log, "reply stream read")
        while not self._stopping:
            try:
                if time.monotonic() >= self._next_ttl:
                    await self._keep_stream()
                key = self.reply_to.encode()
                (reply,) = await self.reader.execute([Command(key, (*_XREAD, key, self._last_id))])
                if isinstance(reply, Exception):
                    raise reply
                backoff_s = 0.05
                if self._redis_down:  # what started during the outage may have lost its
                    # answer too (a result a worker dropped while it held this node away):
                    # the outage ends now, not at its last failed read, so a request that
                    # began in the backoff gets a 503 (a job is run again), not a 504 that a
                    # job keeps for good (a helper's cluster probe)
                    self.read_failed_ms = time.time() * 1000
                    self._redis_down = False
                self.read_failure = None
                retry_log.succeeded()
            except Exception as exc:  # see the docstring
                if self._stopping:
                    return
                self.read_failure = refused_for_a_while(exc) or f"{type(exc).__name__}: {exc}"
                if isinstance(exc, REDIS_FAILURES):
                    # Redis failed: what waits now may have lost its answer (a 503, not a 504)
                    self.read_failed_ms = time.time() * 1000
                    self._redis_down = True
                    retry_log.failed(f"failed ({exc})", backoff_s)
                else:
                    retry_log.failed(f"failed ({self.read_failure})", backoff_s, logging.ERROR, exc)
                self._next_ttl = 0.0  # after an outage, make sure our stream still exists
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, READ_BACKOFF_MAX_S)
                continue
            entries = _stream_entries(reply)
            if not entries:
                continue
            self._last_id = entries[-1][0]
            for _entry_id, flat in entries:
                fields = _fields(flat)
                if _HELLO in fields:
                    continue
                try:
                    results, errors = decode_results(fields)
                except EnvelopeError as exc:
                    errors, results = [str(exc)], []
                if errors:
                    self.bad_results += len(errors)
                    log.warning("undecodable result on %s: %s", self.reply_to, errors[0])
                for result in results:
                    self.file(result)


def _expire(key: bytes) -> Command:
    return Command(key, (b"EXPIRE", key, b"%d" % REPLY_TTL_S))


def _stream_entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREAD reply, RESP3 (``{stream: entries}``) or RESP2
    (``[[stream, entries]]``); none on a timeout."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (pair[1] for pair in reply)
    return next(iter(streams), None) or []


def _fields(flat: Any) -> dict[bytes, bytes]:
    """An entry's fields from the flat ``[name, value, ...]`` list of the wire."""
    if isinstance(flat, dict):
        return flat
    if len(flat) == 2:
        return {flat[0]: flat[1]}
    return dict(zip(flat[::2], flat[1::2], strict=True))
