"""Coalesce the XADDs of concurrent requests into one pipelined round trip.

Appends are not awaited: the gateway's request waits once, for its answer, and learns of a
failed publish through ``on_error`` (which fails that wait).

While one pipeline is in flight, new appends queue up; when it returns, everything queued goes
out together. Under load that turns N round trips into about one per event-loop turn, and an
idle gateway still sends each append at once. The batch goes through
``rendezvous.bus.async_router``: raw replies on redis-py's connections, one packed write per node
(a deployment's input stream and the decisions stream may live on different cluster nodes).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable

from redis.exceptions import ResponseError, TryAgainError

from rendezvous.bus.append_commands import PendingAppend, now_ms, plain_xadd, take, xadd
from rendezvous.bus.async_router import Router
from rendezvous.bus.clock import entry_order
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.routing import Command
from rendezvous.retry_log import OncePerSpell

log = logging.getLogger(__name__)
drops_log = logging.getLogger(f"{__name__}.drops")
"""Dropped appends, said at most once every ``REPEAT_S`` a template (with how many lines were
held back, and the appender's running count): in a stall each expiring batch, every ~2 s, was
a line of its own."""
drops_log.addFilter(OncePerSpell())


RETRY_S = 30.0
"""How long an append nobody waits for is tried again while Redis fails: longer than a
cluster's election (``cluster-node-timeout`` plus about a second) at its usual settings."""
RETRY_PAUSE_S = 0.25
MAX_RETRYING = 20_000
"""About a minute of decision records at a few hundred requests a second, ~20-40 MB."""


class AlreadyTaken(Exception):
    """An append's unique key was already taken: nothing was appended."""


class StreamGone(Exception):
    """An append to a stream that must exist found none (NOMKSTREAM): a deleted deployment's
    input, purged, or one Redis lost (its readers make it again): nothing was appended."""


class Fate(enum.Enum):
    """What became of an appended entry, as its stream tells it now."""

    KEPT = "kept"
    """Still there, or trimmed (trimming waits for every reader): the readers had it."""
    GONE = "gone"
    """Removed other than by trimming: a failover took it (or an ``XDEL``)."""
    UNKNOWN = "unknown"
    """Redis cannot say now: it is failing under the question."""


class NotReplicated(Exception):
    """An append was written to its master but not acknowledged by enough replicas in time."""


class StreamAppender:
    def __init__(
        self,
        client: Router,
        max_batch: int = 1024,
        linger_s: float = 0.005,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        retry_s: float = RETRY_S,
        max_retrying: int = MAX_RETRYING,
    ):
        self.client = client
        self.wait_replicas = wait_replicas
        """Replicas an append asked to be ``replicated`` must reach; the batch then ends with
        a ``WAIT`` on each node it wrote to (on the connection that wrote: WAIT covers that
        connection's writes), which holds the batch's reply until they did."""
        self.wait_timeout_ms = wait_timeout_ms
        self.max_batch = max_batch
        self.linger_s = linger_s
        """How long an append that nobody waits for may wait for company (see ``urgent``)."""
        self._queue: list[PendingAppend] = []
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.round_trips = 0
        self._failed_ms: dict[bytes, float] = {}
        self.retry_s = retry_s
        """How long an append nobody waits for (no ``on_error``: decision records) is tried
        again while Redis fails (a restart, a failover's election), every ``RETRY_PAUSE_S``."""
        self.max_retrying = max_retrying
        """Most such appends held for another try; beyond it they are dropped (and counted)."""
        self._retrying: list[PendingAppend] = []
        self._retry_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.dropped = 0
        """Appends nobody waited for, given up: past ``retry_s``, or not Redis's failure."""

    @property
    def held(self) -> int:
        """Appends nobody waits for, held for another try while Redis fails."""
        return len(self._retrying)

    def failed_ms(self, stream: str) -> float:
        """When an append to ``stream`` last failed because Redis did (down, timing out,
        failing over; epoch ms, 0: never): a request on that stream that then waited in vain
        more likely lost its input or its answer to that than to its models."""
        return self._failed_ms.get(stream.encode(), 0.0)

    def append_nowait(
        self,
        stream: str,
        fields: dict[bytes, bytes],
        maxlen: int | None = None,
        on_error: Callable[[Exception], None] | None = None,
        urgent: bool = True,
        unique: tuple[str, int] | None = None,
        unique_owner: str = "",
        replicated: asyncio.Future[None] | None = None,
        on_appended: Callable[[bytes], None] | None = None,
        must_exist: bool = False,
        stamp: bytes | None = None,
    ) -> None:
        """Queue one XADD; a failure goes to ``on_error`` if given, else to the log, and the
        new entry's id to ``on_appended`` if given.

        ``urgent=False`` (decision records: nobody waits for them) lets the append ride with
        the next urgent one, or go after ``linger_s``: under load that halves the round trips,
        which cost the gateway a socket write and a read each.

        ``unique=(key, ttl_ms)``: append only if ``key`` (under the stream's hash tag) is not
        taken, and take it for ``ttl_ms``; else ``on_error`` gets ``AlreadyTaken``. With
        ``unique_owner``, a key that owner holds counts as free: the same request tried again
        (an async job's retry, or its run by another gateway) is not refused as a duplicate of
        itself.

        ``must_exist``: append only to a stream that exists, else ``on_error`` gets
        ``StreamGone`` (a request's input: its stream is made with its readers' groups, and
        is gone only once its deployment was deleted and purged).

        ``stamp``: a field the XADD carries, set to this host's epoch ms as it is sent, not
        as it is queued: a request's time left is judged from it, so a wait here (behind a
        batch that Redis holds) counts against its deadline."""
        taken = (
            (unique[0].encode(), unique[1], unique_owner.encode()) if unique is not None else None
        )
        self._queue.append(
            PendingAppend(
                stream.encode(),
                fields,
                maxlen,
                on_error,
                taken,
                replicated,
                on_appended,
                must_exist,
                stamp,
            )
        )
        if urgent:
            self._kick()
        elif self._timer is None and not self._flushing():
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._kick)

    def _flushing(self) -> bool:
        return self._flusher is not None and not self._flusher.done()

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._flushing():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.round_trips += 1
            sent = now_ms()
            commands = [xadd(item, sent) for item in batch]
            waits = sorted({item.stream for item in batch if item.replicated is not None})
            if self.wait_replicas:
                commands += [Command(stream, (b"WAIT", b"%d" % self.wait_replicas,
                                              b"%d" % self.wait_timeout_ms))
                             for stream in waits]  # fmt: skip
            try:
                results: list[object] = await self.client.execute(commands)
            except Exception as exc:  # a bug: it fails the whole batch, not the gateway
                log.exception("append batch failed")
                results = [exc] * len(commands)
            if any(isinstance(r, TryAgainError) and item.unique is not None
                   for item, r in zip(batch, results, strict=False)):  # fmt: skip
                await self._unique_in_two_steps(batch, results)
            acked = dict(zip(waits, results[len(batch) :], strict=False))
            dropped: Counter[bytes] = Counter()
            why: dict[bytes, object] = {}  # the last failure of each stream's dropped appends
            for item, result in zip(batch, results, strict=False):
                if result is None:
                    result = _nothing_appended(item)
                elif isinstance(result, ResponseError) and str(result).startswith("NOSTREAM"):
                    result = _gone(item)
                if item.replicated is not None and not item.replicated.done():
                    self._settle(item.replicated, item.stream, result, acked.get(item.stream))
                if not isinstance(result, Exception):
                    if item.on_appended is not None and isinstance(result, bytes):
                        try:
                            item.on_appended(result)
                        except Exception:  # the other appends' callbacks still run
                            log.exception("append callback failed")
                    continue
                if isinstance(result, REDIS_FAILURES):  # not a taken id, not a bug
                    self._failed_ms[item.stream] = time.time() * 1000
                if item.on_error is None:
                    if not (isinstance(result, REDIS_FAILURES) and self._retry_later(item)):
                        dropped[item.stream] += 1
                        why[item.stream] = result
                    continue
                try:
                    item.on_error(result)
                except Exception:
                    log.exception("append error handler failed")
            for stream, n in dropped.items():  # one line a stream, not one an append
                self.dropped += n
                drops_log.warning("dropped %d append(s) to %s (%d so far): %s", n,
                                  stream.decode(), self.dropped, why[stream])  # fmt: skip

    def _retry_later(self, item: PendingAppend) -> bool:
        """Hold a failed fire-and-forget append for another try, unless its time is up or
        too many are held. A failure that hid a success (a reply lost after the write) makes
        the retry a duplicate: decision records are at least once, as the workers' results."""
        now = time.monotonic()
        if not item.give_up_at:
            item.give_up_at = now + self.retry_s
        if self._closing or now >= item.give_up_at or len(self._retrying) >= self.max_retrying:
            return False
        self._retrying.append(item)
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(RETRY_PAUSE_S, self._requeue)
        return True

    def _requeue(self) -> None:
        """The held appends go out with the next batch."""
        self._retry_timer = None
        held, self._retrying = self._retrying, []
        self._queue.extend(held)
        if self._queue:
            self._kick()

    async def _unique_in_two_steps(self, batch: list[PendingAppend], results: list[object]) -> None:
        """While its slot migrates, the script's new key and its stream are split between two
        nodes (TRYAGAIN, as long as the migration lasts): take the key, then append, one key a
        command, so each follows its own redirect. Not atomic: a gateway that dies between the
        two leaves the id taken and nothing published, which its caller sees as a failure."""
        todo = [i for i, item in enumerate(batch)
                if item.unique is not None and isinstance(results[i], TryAgainError)]  # fmt: skip
        taken = await self.client.execute([take(batch[i]) for i in todo])
        for i, reply in zip(todo, taken, strict=True):
            results[i] = None if reply is None else reply  # None: taken by another
        todo = [i for i, reply in zip(todo, taken, strict=True) if reply == b"OK"]
        sent = now_ms()
        appended = await self.client.execute([plain_xadd(batch[i], sent) for i in todo])
        for i, reply in zip(todo, appended, strict=True):
            results[i] = _gone(batch[i]) if reply is None else reply

    def _settle(
        self, replicated: asyncio.Future[None], stream: bytes, result: object, acked: object
    ) -> None:
        if isinstance(result, Exception):
            replicated.cancel()  # the append failed: ``on_error`` says so to its waiter
        elif self.wait_replicas and not (isinstance(acked, int) and acked >= self.wait_replicas):
            why = acked if isinstance(acked, Exception) else f"{acked} acknowledged"
            replicated.set_exception(NotReplicated(
                f"the request was not acknowledged by {self.wait_replicas} replica(s) of "
                f"{stream.decode()} within {self.wait_timeout_ms} ms ({why})"))  # fmt: skip
        else:
            replicated.set_result(None)

    async def fate(self, stream: str, entry_id: bytes) -> Fate:
        """What became of an entry this appender wrote to ``stream``. Redis replicates
        asynchronously: a master that failed over before its replica had the entry took it
        along, and the promoted replica never saw it. Asked only of a request that waited in
        vain, to tell a 503 (Redis lost it: retry) from a 504 (the models did not answer): one
        round trip, on the node that holds ``stream``."""
        key = stream.encode()
        try:
            found, info = await self.client.execute(
                [Command(key, (b"XRANGE", key, entry_id, entry_id)),
                 Command(key, (b"XINFO", b"STREAM", key))])  # fmt: skip
        except REDIS_FAILURES:
            return Fate.UNKNOWN
        except Exception:
            log.exception("checking %s for entry %s failed", stream, entry_id.decode())
            return Fate.KEPT  # no reason to blame Redis
        if isinstance(found, REDIS_FAILURES):
            return Fate.UNKNOWN  # Redis is failing under it now
        if isinstance(found, Exception) or found:
            return Fate.KEPT
        if isinstance(info, Exception):
            return Fate.GONE  # no such stream any more: it went with its node
        fields = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2], strict=False))
        first = fields.get(b"first-entry")
        last = fields.get(b"last-generated-id")
        if last is not None and entry_order(last) < entry_order(entry_id):
            return Fate.GONE  # this master never generated an id as late as ours
        # Trimming takes the oldest entries first: an entry missing behind the first one
        # left was removed by something else (the failover, or an XDEL).
        if first and entry_order(first[0]) < entry_order(entry_id):
            return Fate.GONE
        return Fate.KEPT  # trimmed: every reader had it

    async def any_taken(self, keys: list[str], owner: str = "") -> bool:
        """Whether any of the ``unique`` keys ``keys`` is taken: one round trip, each asked on
        its node (a caller's request id under an earlier partition count's tags). With
        ``owner``, a key that owner holds counts as free, as in ``append_nowait`` (an async
        job's run tried again after a change of count found its own earlier run's key and
        failed 409 on its own id). Raises a Redis failure."""
        replies = await self.client.execute(
            [Command(raw, (b"GET", raw)) for raw in (key.encode() for key in keys)]
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        mine = owner.encode()
        return any(held is not None and (not owner or held != mine) for held in replies)

    async def release(self, key: str) -> bool:
        """Free a ``unique`` key whose entry is gone (``Fate.GONE``), so that the caller's
        retry under the same id is taken; False if Redis could not do it now."""
        raw = key.encode()
        try:
            [reply] = await self.client.execute([Command(raw, (b"DEL", raw))])
        except Exception as exc:
            reply = exc
        if isinstance(reply, Exception):
            log.warning("could not release %s: %s", key, reply)
            return False
        return True

    async def close(self) -> None:
        """Send what is queued, and what is held for another try (one last try)."""
        self._closing = True
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._requeue()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)


def _nothing_appended(item: PendingAppend) -> Exception:
    """Why an append replied nil: its unique key was taken, or its stream is gone."""
    if item.unique is not None:
        return AlreadyTaken(item.unique[0].decode())
    return _gone(item)


def _gone(item: PendingAppend) -> StreamGone:
    return StreamGone(f"{item.stream.decode()} does not exist")
