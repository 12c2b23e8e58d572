"""The log bin: consumer group ``logbin`` on every deployment's input stream, archived to disk.

Delivery is at-least-once and nothing is lost: an entry is acked only after its batch is
written and fsynced. After a crash or a Redis outage the bin first re-reads its own pending
entries (id ``0``) before new ones (``>``), and it periodically XAUTOCLAIMs entries that a dead
consumer of the group left pending. A redelivery may archive an entry twice; the reader drops
such duplicates by stream id. Runs in its own process with a synchronous client, because
fsync blocks.

Nobody waits for the archive, so after a read that did not fill a batch the bin waits
``batch_wait_ms`` before reading again: at moderate load one read, one gzip member, one fsync
and one ack then carry many requests instead of one each.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from models.archive import SegmentWriter, record_from_envelope
from rendezvous import names
from rendezvous.bus.retention import trim_input_stream
from rendezvous.envelope import RequestEnvelope

log = logging.getLogger(__name__)

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

LOGBIN_BATCH_WAIT_MS = 20.0
"""Default wait after a read that did not fill a batch, so the next one gathers more."""

Entry = tuple[str, bytes, dict[bytes, bytes]]
"""(stream key, entry id, fields) of one stream entry."""


@dataclass
class LogBinStats:
    """Counters since the process started; published to ``LOGBIN_STATS`` about once a
    second, since the log bin has no HTTP port of its own for ``/metrics``."""

    records: int = 0
    """Records archived (written and fsynced, undecodable ones included); one redelivered
    after a lost ack is counted again."""
    bytes_written: int = 0
    """Compressed bytes appended to segments."""
    batches: int = 0
    undecodable: int = 0
    reclaimed: int = 0
    """Entries taken over from other consumers by XAUTOCLAIM."""
    errors: int = 0
    """Redis or disk failures that the loop rode out."""
    trimmed: int = 0
    """Input-stream entries trimmed behind the slowest consumer group."""


class LogBin:
    def __init__(
        self,
        client: redis.Redis,
        writer: SegmentWriter,
        *,
        consumer: str,
        deployments: Callable[[], list[str]] | list[str],
        batch_size: int = 512,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        refresh_s: float = 5.0,
        trim_interval_s: float = 1.0,
        heartbeat_s: float = 1.0,
        batch_wait_ms: float = LOGBIN_BATCH_WAIT_MS,
    ):
        if block_ms <= 0:
            raise ValueError("block_ms must be positive: BLOCK 0 would never notice a stop")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the log bin needs a client with decode_responses=False")
        self.client = client
        self.writer = writer
        self.consumer = consumer
        self.group = names.LOGBIN_GROUP
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.refresh_s = refresh_s
        """How often a callable ``deployments`` is asked again."""
        self.trim_interval_s = trim_interval_s
        """How often the input streams are trimmed behind their slowest group (0: never)."""
        self._next_trim = 0.0
        self.heartbeat_s = heartbeat_s
        """How often the counters are published to ``LOGBIN_STATS``."""
        self._next_heartbeat = 0.0
        self.batch_wait_s = max(batch_wait_ms, 0.0) / 1000
        """Wait after a short read before the next blocking one (``drain`` never waits)."""
        self._read_after = 0.0
        self._pause: Callable[[float], object] = time.sleep
        """How the wait is spent: ``stop.wait`` under ``run``, so a stop cuts it short."""
        self.stats = LogBinStats()
        self._source = deployments
        self._streams: dict[str, str] = {}
        """Input stream key -> deployment, for the deployments being archived now."""
        self._pending: set[str] = set()
        """Streams whose own pending entries have still to be re-read (id 0)."""
        self._claiming: dict[str, str] = {}
        """Streams in an XAUTOCLAIM scan -> the scan's cursor."""
        self._next_refresh = 0.0
        self._next_claim = 0.0

    # -- loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Archive until ``stop`` is set, riding out Redis and disk failures; then close the
        writer and remove our published counters (so they leave ``/metrics`` at once, where a
        killed process's only go stale). The batch in hand is always finished (written,
        fsynced, acked) first."""
        backoff_s = 0.05
        self._pause = stop.wait
        try:
            while not stop.is_set():
                try:
                    self.step(self.block_ms)
                    if not self._streams:
                        stop.wait(self.block_ms / 1000)
                    backoff_s = 0.05
                    continue
                except _REDIS_DOWN as exc:
                    log.warning("logbin: redis unavailable (%s); retry in %.2fs", exc, backoff_s)
                except OSError as exc:
                    log.error("logbin: archive write failed (%s); retry in %.2fs", exc, backoff_s)
                except Exception:
                    # A dead log bin silently stops the archive: log loudly and keep going.
                    log.exception("logbin: unexpected error; retry in %.2fs", backoff_s)
                self.stats.errors += 1
                self._reset()
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
        finally:
            self.writer.close()
            self.unpublish()

    def unpublish(self) -> None:
        """Remove our counters from ``LOGBIN_STATS`` (best effort: Redis may be down)."""
        try:
            self.client.hdel(names.LOGBIN_STATS, self.consumer)
        except redis.RedisError as exc:
            log.warning("logbin: could not remove its stats: %s", exc)

    def stats_json(self, now_s: float) -> str:
        return json.dumps({"ts": now_s, **dataclasses.asdict(self.stats)})

    def _heartbeat_due(self) -> float | None:
        """The time to publish with (epoch s) when the counters are due, else None."""
        now = time.time()
        if now < self._next_heartbeat:
            return None
        self._next_heartbeat = now + self.heartbeat_s
        return now

    def drain(self) -> int:
        """Archive until nothing new, own-pending or claimable is left; returns records archived.

        Errors propagate (tests, one-off catch-ups); the writer stays open."""
        total = 0
        while True:
            n = self.step(block_ms=None)
            total += n
            if n == 0 and not self._pending and not self._claiming:
                return total

    def step(self, block_ms: int | None) -> int:
        """One read (at most ``batch_size`` per stream), one fsynced write per deployment, one
        pipelined ack. Returns the number of records archived."""
        self._refresh()
        if not self._streams:
            self._publish()
            return 0
        if block_ms is not None:
            delay_s = self._read_after - time.monotonic()
            if delay_s > 0:
                self._pause(delay_s)
        try:
            entries = self._read(block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("logbin: a consumer group vanished (%s); recreating", exc)
            self._reset()
            self._refresh()
            return 0
        if block_ms is not None and 0 < len(entries) < self.batch_size:
            self._read_after = time.monotonic() + self.batch_wait_s
        archived = self._archive(entries) if entries else 0
        self._publish()
        self._trim()
        return archived

    def _publish(self) -> None:
        """Counters on their own when no ack round trip carried them (an idle bin)."""
        now = self._heartbeat_due()
        if now is not None:
            self.client.hset(names.LOGBIN_STATS, self.consumer, self.stats_json(now))

    def _trim(self) -> None:
        """The archive owns retention: it trims only behind every group, itself included."""
        now = time.monotonic()
        if not self.trim_interval_s or now < self._next_trim:
            return
        self._next_trim = now + self.trim_interval_s
        for dep in self._streams.values():
            self.stats.trimmed += trim_input_stream(self.client, dep)

    # -- deployments --------------------------------------------------------------------------

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        deployments = self._source() if callable(self._source) else self._source
        wanted: dict[str, str] = {}
        for dep in deployments:
            try:
                wanted[names.input_stream(dep)] = dep
            except names.InvalidName as exc:
                log.warning("logbin: skipping deployment: %s", exc)
        for stream in list(self._streams):
            if stream not in wanted:
                del self._streams[stream]
                self._pending.discard(stream)
                self._claiming.pop(stream, None)
        for stream, dep in wanted.items():
            if stream not in self._streams:
                self._create_group(stream)
                self._streams[stream] = dep
                self._pending.add(stream)
                log.info("logbin: archiving deployment %s", dep)
        self._next_refresh = now + self.refresh_s

    def _create_group(self, stream: str) -> None:
        try:
            self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _reset(self) -> None:
        """After a failure: recreate groups if needed and re-read our own pending entries,
        since a lost ack or a failed write left them unarchived or unacked."""
        self._streams.clear()
        self._pending.clear()
        self._claiming.clear()
        self._next_refresh = 0.0

    # -- reading ------------------------------------------------------------------------------

    def _read(self, block_ms: int | None) -> list[Entry]:
        if self._pending:
            reply = self.client.xreadgroup(
                self.group, self.consumer, dict.fromkeys(self._pending, "0"), count=self.batch_size
            )
            by_stream = _by_stream(reply)
            self._pending.difference_update([s for s in self._pending if not by_stream.get(s)])
            entries = [(s, i, f) for s, found in by_stream.items() for i, f in found]
            if entries:
                return entries
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(self.claim_idle_ms / 1000 / 2, 0.5)
            self._claiming = dict.fromkeys(self._streams, "0-0")
        if self._claiming:
            entries = self._claim()
            if entries:
                return entries
        reply = self.client.xreadgroup(
            self.group,
            self.consumer,
            dict.fromkeys(self._streams, ">"),
            count=self.batch_size,
            block=block_ms,
        )
        return [(s, i, f) for s, found in _by_stream(reply).items() for i, f in found]

    def _claim(self) -> list[Entry]:
        """One XAUTOCLAIM page per stream still being scanned."""
        entries: list[Entry] = []
        for stream, cursor in list(self._claiming.items()):
            reply = self.client.xautoclaim(
                stream, self.group, self.consumer, self.claim_idle_ms, cursor, count=self.batch_size
            )
            next_cursor = _text(reply[0])
            if next_cursor == "0-0":
                del self._claiming[stream]
            else:
                self._claiming[stream] = next_cursor
            claimed = [(stream, i, f) for i, f in reply[1]]
            # Entries trimmed away while pending: XAUTOCLAIM drops them from the group.
            deleted = reply[2] if len(reply) > 2 else []
            claimed.extend((stream, i, {}) for i in deleted)
            self.stats.reclaimed += len(claimed)
            entries.extend(claimed)
        if entries:
            log.info("logbin: reclaimed %d entries from dead consumers", len(entries))
        return entries

    # -- archiving ----------------------------------------------------------------------------

    def _archive(self, entries: list[Entry]) -> int:
        archived_ms = time.time() * 1000
        records: dict[str, list[str]] = {}
        ids: dict[str, list[bytes]] = {}
        undecodable: dict[str, int] = {}
        for stream, entry_id, fields in entries:
            dep = self._streams[stream]
            line, decoded = self._record(dep, _text(entry_id), fields, archived_ms)
            undecodable[stream] = undecodable.get(stream, 0) + (not decoded)
            records.setdefault(stream, []).append(line)
            ids.setdefault(stream, []).append(entry_id)
        written: list[str] = []
        try:
            for stream, batch in records.items():
                self.stats.bytes_written += self.writer.append_batch(self._streams[stream], batch)
                written.append(stream)
        finally:
            # Ack what is on disk even if a later deployment's write failed. Counted before
            # the ack so that the counters riding in the ack's round trip include this batch.
            if written:
                self.stats.records += sum(len(ids[s]) for s in written)
                self.stats.undecodable += sum(undecodable[s] for s in written)
                self.stats.batches += 1
                self._ack({s: ids[s] for s in written})
        return len(entries)

    def _record(
        self, dep: str, stream_id: str, fields: dict[bytes, bytes], archived_ms: float
    ) -> tuple[str, bool]:
        """The entry's archive line, and whether it decoded (else the line keeps its fields)."""
        if not fields:
            error = "entry was deleted from the stream before it was archived"
        else:
            try:
                env = RequestEnvelope.decode(fields)
                return record_from_envelope(stream_id, env, archived_ms), True
            except Exception as exc:  # any malformed entry is archived as such, never fatal
                error = f"{type(exc).__name__}: {exc}"
        log.warning("logbin: %s entry %s undecodable: %s", dep, stream_id, error)
        record = {
            "stream_id": stream_id,
            "deployment": dep,
            "undecodable": True,
            "error": error,
            "archived_ms": archived_ms,
            "fields_b64": {
                _text(k): base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode()
                for k, v in fields.items()
            },
        }
        return json.dumps(record, separators=(",", ":")), False

    def _ack(self, ids: dict[str, list[bytes]]) -> None:
        """All acks of a batch in one round trip, after the data is fsynced; the counters
        ride along when due, so a busy bin publishes them at no extra round trip."""
        pipe = self.client.pipeline(transaction=False)
        for stream, entry_ids in ids.items():
            pipe.xack(stream, self.group, *entry_ids)
        now = self._heartbeat_due()
        if now is not None:
            pipe.hset(names.LOGBIN_STATS, self.consumer, self.stats_json(now))
        pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _by_stream(reply: Any) -> dict[str, list[tuple[bytes, dict[bytes, bytes]]]]:
    """XREADGROUP's reply as {stream: entries}, for both the RESP2 and the RESP3 shape."""
    if not reply:
        return {}
    items = reply.items() if isinstance(reply, dict) else reply
    out: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
    for stream, found in items:
        if found and isinstance(found[0], list):  # RESP3: entries wrapped in one more list
            found = found[0]
        out[_text(stream)] = [(i, f or {}) for i, f in (found or [])]
    return out
