"""The outcomes a label is joined to, kept in Redis for the feedback retention, bounded in bytes.

Each gateway process files the outcome (``rendezvous.outcomes.Outcome``) of every decision
record it closes into a buffer, as the drift feed does, and writes the buffer every
``flush_s`` in one script per deployment: no Redis command is added per request, and no process
re-reads the decisions stream (a stream trimmed by count, which is why outcomes are kept apart:
a label days late still finds its request). Outcomes live in hashes bucketed by decision time
(``names.outcomes_key``: field request id), each expiring ``retention + bucket`` after its
last write; a byte count per bucket is kept beside them, and the oldest buckets are dropped
whenever the deployment's total passes ``max_bytes``. A time bucket is written in parts of at
most ``max_bytes / PART_SHARE``: a busy deployment fills its 256 MB within the hour (1,400
requests a second at 190 bytes), and the bound must then drop that hour's oldest parts, not
wait for the next hour while Redis grows. Every key is under the deployment's tag, so the
scripts run on one node of a cluster. A process that dies loses its last ``flush_s`` of
outcomes (their decision records are in the stream all the same); a Redis that fails for a
while (a restart, a failover) gets them once it answers again, up to ``UNWRITTEN_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from rendezvous import names
from rendezvous.bus.connection import AsyncClient, text
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.decision import DecisionRecord
from rendezvous.outcomes import encode_record, held_buckets
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

ENTRY_OVERHEAD_BYTES = 64
"""Redis's own cost of a hash field beyond its id and value bytes (a hashtable entry and two
string headers, after allocator rounding; measured with MEMORY USAGE, see the README)."""

UNWRITTEN_S = 30.0
"""How long an outcome Redis did not take is tried again: longer than a cluster's election at
its usual settings (``cluster-node-timeout`` plus about a second)."""
MAX_UNWRITTEN = 20_000
"""Most outcomes held per deployment meanwhile (about 1-2 kB of memory each)."""

PARTS = 10_000
"""A bucket's id is its time bucket x PARTS + its part, so ids sort by time, parts included."""
PART_SHARE = 16
"""A part is closed once it holds ``max_bytes / PART_SHARE``: the bound is kept within that."""

ENCODE_SLICE = 256
"""Outcomes encoded between two yields to the event loop (about 1 ms of work)."""

_WRITE = """
local ttl = tonumber(ARGV[1])
local overhead = tonumber(ARGV[2])
local part_bytes = tonumber(ARGV[3])
local at = 4
local parts = {}
for k = 2, #KEYS do
  local bucket, time_bucket, part = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local n = tonumber(ARGV[at + 3])
  at = at + 4
  local bytes = 0
  for i = 0, n - 1 do
    bytes = bytes + #ARGV[at + 2 * i] + #ARGV[at + 2 * i + 1] + overhead
  end
  -- one HSET per 500 fields, not per field: Redis's cost of a call is most of a small one's
  for from = at, at + 2 * n - 1, 1000 do
    redis.call('HSET', KEYS[k], unpack(ARGV, from, math.min(from + 999, at + 2 * n - 1)))
  end
  at = at + 2 * n
  redis.call('EXPIRE', KEYS[k], ttl)
  local size = redis.call('HINCRBY', KEYS[1], 'b:' .. bucket, bytes)
  local field = 'p:' .. time_bucket
  local open = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if size >= part_bytes and part >= open and part + 1 < PARTS then
    open = part + 1
    redis.call('HSET', KEYS[1], field, open)
  end
  parts[#parts + 1] = open
end
local total = 0
local state = redis.call('HGETALL', KEYS[1])
for i = 1, #state, 2 do
  if string.sub(state[i], 1, 2) == 'b:' then total = total + tonumber(state[i + 1]) end
end
return {total, parts}
""".replace("PARTS", str(PARTS))

_FIND = """
local out = {}
local left = {}
for i = 1, #ARGV do left[i] = ARGV[i] end
for k = 1, #KEYS do
  local ids, where = {}, {}
  for i, id in pairs(left) do ids[#ids + 1] = id; where[#where + 1] = i end
  if #ids == 0 then break end
  for from = 1, #ids, 1000 do  -- unpack has a bound of its own
    local to = math.min(from + 999, #ids)
    local found = redis.call('HMGET', KEYS[k], unpack(ids, from, to))
    for j = 1, to - from + 1 do
      local v = found[j]
      if v then
        out[#out + 1] = {where[from + j - 1], k, v}
        left[where[from + j - 1]] = nil
      end
    end
  end
end
return out
"""


class OutcomeStore:
    def __init__(
        self,
        client: AsyncClient,
        *,
        retention_s: float,
        bucket_s: float,
        max_bytes: int,
        flush_s: float = 0.25,
    ):
        self.client = client
        self.retention_s = retention_s
        self.bucket_s = bucket_s
        self.max_bytes = max_bytes
        self.flush_s = flush_s
        self._pending: dict[str, list[tuple[str, DecisionRecord]]] = {}
        self._flushing = asyncio.Lock()
        self._newest: dict[str, int] = {}
        self._open_part: dict[tuple[str, int], int] = {}
        """(deployment, time bucket) -> the part to write, as the last write's script said."""
        self.pruned_buckets = 0

    @property
    def enabled(self) -> bool:
        return self.retention_s > 0

    # -- writing ---------------------------------------------------------------------------

    def observe(self, record: DecisionRecord) -> None:
        """Called for every decision record this process closes: queued, nothing else."""
        if self.enabled and record.outputs:
            self._pending.setdefault(record.deployment, []).append((record.request_id, record))

    def bucket_of(self, ts_ms: float) -> int:
        """The time bucket of a decision time (a bucket id's ``// PARTS``)."""
        return int(ts_ms / 1000 // self.bucket_s)

    def live_buckets(self, now_ms: float | None = None) -> range:
        """The time buckets a kept outcome may be in, newest first (a range: never a list)."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        newest = self.bucket_of(now_ms)
        oldest = self.bucket_of(now_ms - self.retention_s * 1000)
        return range(newest, oldest - 1, -1)

    @property
    def part_bytes(self) -> int:
        return max(1, self.max_bytes // PART_SHARE)

    @property
    def ttl_s(self) -> int:
        return int(self.retention_s + self.bucket_s) + 1

    async def flush(self) -> int:
        """Write every queued outcome; returns how many. One script per deployment (its keys
        share a slot), the oldest buckets pruned after it when the bound is passed."""
        async with self._flushing:
            pending, self._pending = self._pending, {}
            written, failure = 0, None
            for deployment, items in pending.items():
                try:
                    written += await self._write(deployment, items)
                except REDIS_FAILURES as exc:  # that node only: the others are written
                    self._keep_unwritten(deployment, items)
                    failure = failure or exc
            if failure is not None:
                raise failure
            return written

    def _keep_unwritten(self, deployment: str, items: list[tuple[str, DecisionRecord]]) -> None:
        """Outcomes Redis did not take (a restart, a failover's election) go out with the next
        flush: those of the last ``UNWRITTEN_S``, at most ``MAX_UNWRITTEN`` a deployment (the
        newest). Written twice, an outcome is the same hash field again."""
        oldest_ms = (time.time() - UNWRITTEN_S) * 1000
        queued = self._pending.get(deployment, [])  # observed while the flush waited
        kept = ([item for item in items if item[1].ts_ms >= oldest_ms] + queued)[-MAX_UNWRITTEN:]
        dropped = len(items) + len(queued) - len(kept)
        if dropped:
            log.warning("feedback: %d outcome(s) of %s dropped unwritten (Redis failing)",
                        dropped, deployment)  # fmt: skip
        self._pending[deployment] = kept

    async def _write(self, deployment: str, items: list[tuple[str, DecisionRecord]]) -> int:
        by_bucket: dict[int, list[bytes | str]] = {}  # time bucket -> id, outcome, ...
        for start in range(0, len(items), ENCODE_SLICE):
            for request_id, record in items[start : start + ENCODE_SLICE]:
                blob = encode_record(record)
                if blob is not None:
                    bucket = self.bucket_of(record.ts_ms)
                    by_bucket.setdefault(bucket, []).extend((request_id, blob))
            await asyncio.sleep(0)  # let the requests waiting meanwhile go on
        if not by_bucket:
            return 0
        keys = [names.outcomes_state_key(deployment)]
        args: list[Any] = [self.ttl_s, ENTRY_OVERHEAD_BYTES, self.part_bytes]
        written = sorted(by_bucket.items())
        ids = []
        for time_bucket, pairs in written:
            part = self._open_part.get((deployment, time_bucket), 0)
            ids.append(time_bucket * PARTS + part)
            keys.append(names.outcomes_key(deployment, ids[-1]))
            args += [ids[-1], time_bucket, part, len(pairs) // 2, *pairs]
        reply = await self.client.eval(_WRITE, len(keys), *keys, *args)  # type: ignore[misc]
        total, parts = reply
        for (time_bucket, _pairs), part in zip(written, parts, strict=True):
            self._open_part[(deployment, time_bucket)] = int(part)
        if len(self._open_part) > 4 * len(written) + 64:  # forget the time buckets gone by
            newest_time = max(by_bucket)
            self._open_part = {k: v for k, v in self._open_part.items() if k[1] >= newest_time - 1}
        newest = max(ids)
        if int(total) > self.max_bytes or self._newest.get(deployment) != newest:
            try:  # a new bucket: forget the expired ones' counts
                await self.prune(deployment)
                self._newest[deployment] = newest
            except REDIS_FAILURES as exc:  # written all the same: pruned at the next flush
                log.warning("feedback: cannot prune %s's outcomes: %s", deployment, exc)
        return sum(len(p) // 2 for p in by_bucket.values())

    async def prune(self, deployment: str) -> int:
        """Forget the byte counts of buckets past the retention, and drop the oldest buckets
        while the deployment's outcomes hold more than ``max_bytes`` (never the newest)."""
        state = names.outcomes_state_key(deployment)
        raw = await self.client.hgetall(state)  # type: ignore[misc]
        sizes = {int(text(k)[2:]): int(v) for k, v in raw.items() if text(k).startswith("b:")}
        oldest_live = self.live_buckets()[-1] * PARTS
        drop = [b for b in sizes if b < oldest_live]
        stale_parts = [text(k) for k in raw if text(k).startswith("p:")
                       and int(text(k)[2:]) * PARTS < oldest_live]  # fmt: skip
        total = sum(v for b, v in sizes.items() if b >= oldest_live)
        for bucket in sorted(b for b in sizes if b >= oldest_live)[:-1]:
            if total <= self.max_bytes:
                break
            drop.append(bucket)
            total -= sizes[bucket]
            self.pruned_buckets += 1
            log.warning("feedback: dropped %s's outcomes of bucket %d (RDV_FEEDBACK_MAX_MB)",
                        deployment, bucket)  # fmt: skip
        if drop or stale_parts:
            pipe = self.client.pipeline(transaction=False)
            for bucket in drop:
                pipe.delete(names.outcomes_key(deployment, bucket))
                pipe.delete(names.labels_key(deployment, bucket))
                pipe.delete(names.label_entries_key(deployment, bucket))
                pipe.hdel(state, f"b:{bucket}")
            if stale_parts:
                pipe.hdel(state, *stale_parts)
            await pipe.execute()
        return len(drop)

    async def run(self) -> None:
        """Flush every ``flush_s``; what a Redis outage kept from being written goes out with
        a later flush (see ``_keep_unwritten``)."""
        retry_log = RetryLog(log, "feedback: writing outcomes")  # not four lines a second
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                # Only a write says Redis works again: a flush with nothing left to write (what
                # an outage held was dropped past UNWRITTEN_S) said "working again" 30 s into an
                # outage that went on (a helper's outage probe).
                if await self.flush():
                    retry_log.succeeded()
            except REDIS_FAILURES as exc:
                retry_log.failed(exc)
            except Exception:
                log.exception("outcome flush failed")

    # -- reading ---------------------------------------------------------------------------

    async def find(
        self, deployment: str, request_ids: Sequence[str], within_s: float | None = None
    ) -> dict[str, tuple[int, bytes]]:
        """request id -> (bucket, encoded outcome) of the ids still kept: the state's list of
        buckets, then one script over every live one, newest first (``within_s``: only the
        buckets of that many latest seconds, for the look again at requests answered a moment
        ago)."""
        if not request_ids:
            return {}
        live = self.live_buckets()
        if within_s is not None:
            live = live[: int(within_s // self.bucket_s) + 2]
        fields = await self.client.hkeys(names.outcomes_state_key(deployment))  # type: ignore[misc]
        buckets = [b for b in reversed(held_buckets(fields)) if live[-1] <= b // PARTS <= live[0]]
        if not buckets:
            return {}
        keys = [names.outcomes_key(deployment, b) for b in buckets]
        reply = await self.client.eval(_FIND, len(keys), *keys, *request_ids)  # type: ignore[misc]
        return {request_ids[int(i) - 1]: (buckets[int(k) - 1], blob) for i, k, blob in reply}
