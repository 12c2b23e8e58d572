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

The reading (own pending first, XAUTOCLAIM, backoff, groups recreated after a Redis restart,
stop) is the shared ``ConsumerLoop``; the bin adds which deployments are read, the archive, its
acks after the fsync, and retention. Since it decodes every request's features anyway, it also
hands the archived rows to the feature detectors (``feature_watch``), whose alert claims ride in
the ack's round trip; they never hold up or break the archive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from models.archive import SegmentWriter
from models.archive_line import archive_line, text
from models.deployment_purge import Purger
from models.feature_watch import FeatureWatch
from models.logbin_states import DeploymentStates
from models.logbin_watch import DetectorRelay
from models.name_owner import NameLost, let_go, lost, renewal
from rendezvous import names
from rendezvous.bus.aside import ASIDE_S, UNREACHABLE
from rendezvous.bus.connection import Client
from rendezvous.bus.consumer import BACKOFF_MAX_S, Batch, ConsumerLoop, Entry
from rendezvous.bus.failures import REDIS_DOWN, REDIS_FAILURES, refused_for_a_while
from rendezvous.bus.retention import Retention
from rendezvous.bus.routing import Command, command, raise_first_error
from rendezvous.envelope import RequestEnvelope
from rendezvous.retry_log import RetryLog
from rendezvous.spec import FeatureSpec

log = logging.getLogger(__name__)

LOGBIN_BATCH_WAIT_MS = 20.0
"""Default wait after a read that did not fill a batch, so the next one gathers more."""


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
    failing: str = ""
    """Why the last archive write failed, until one succeeds again ("": archiving). The
    gateway's ``/readyz`` and ``rdv_logbin_failing`` say it: the entries meanwhile wait in the
    input stream, so callers notice nothing until its backlog bound."""


class LogBin(ConsumerLoop):
    def __init__(
        self,
        client: Client,
        writer: SegmentWriter,
        *,
        consumer: str,
        deployments: Callable[[], list[str]] | list[str],
        batch_size: int = 512,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        refresh_s: float = 5.0,
        trim_interval_s: float = 1.0,
        max_role_lag: int = 0,
        heartbeat_s: float = 1.0,
        batch_wait_ms: float = LOGBIN_BATCH_WAIT_MS,
        watch_features: bool = True,
        feature_watch: FeatureWatch | None = None,
        owner_token: str | None = None,
        purger: Purger | None = None,
        timeout_s: float | None = None,
    ):
        """``purger``: purges the deleted deployments this bin has drained (None: not here);
        ``timeout_s``: the client's socket timeout (``ModelWorker``'s)."""
        if block_ms <= 0:
            raise ValueError("block_ms must be positive: BLOCK 0 would never notice a stop")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the log bin needs a client with decode_responses=False")
        super().__init__(
            client,
            group=names.LOGBIN_GROUP,
            consumer=consumer,
            batch_size=batch_size,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            heartbeat_s=heartbeat_s,
            create_groups=True,
            timeout_s=timeout_s,
        )
        self.writer = writer
        self.refresh_s = refresh_s
        """How often a callable ``deployments`` is asked again."""
        self._say_failing_at = 0.0
        self._said_failing = ""
        """The failure last logged: said again when another, or a minute on."""
        self._failing_redis = False
        """``stats.failing`` is Redis refusing writes: cleared by the next write that Redis
        takes (the counters), not only by an archived batch. An idle bin published "Redis
        refuses writes" for as long as no request came, after Redis took writes again, and
        ``/readyz`` said the archive failing (a helper's probe)."""
        self.owner_token = owner_token  # its hold on the name (models.name_owner), or None
        self.name_lost: NameLost | None = None
        """Set when another log bin took the name meanwhile: this one stops (``failed``)."""
        self.retention = Retention(client, trim_interval_s, max_role_lag)
        """The archive owns retention: it trims only behind every group, itself included."""
        self.states = DeploymentStates(self.bus)
        """The archived deployments' states, as last read."""
        self.batch_wait_s = max(batch_wait_ms, 0.0) / 1000
        self.stats = LogBinStats()
        self.retry_log = RetryLog(log, "logbin")
        self._refresh_log = RetryLog(log, "logbin: reading the deployments")
        self._source = deployments
        self._streams: dict[str, str] = {}
        """Input stream key -> deployment, for the deployments being archived now."""
        self._stream_keys: tuple[str, ...] = ()
        self._next_refresh = 0.0
        self.watch = feature_watch or (FeatureWatch(consumer) if watch_features else None)
        """The feature detectors, on the archived rows (None: not run here)."""
        self.detectors = DetectorRelay(self.watch, self.bus)
        self.purger = purger

    # -- the consumer loop's hooks ------------------------------------------------------------

    def streams_to_read(self) -> tuple[str, ...]:
        self._refresh()
        return self._stream_keys

    def group_vanished(self) -> None:
        self._next_refresh = 0.0  # purged, perhaps: read the states before making streams

    def makes_stream(self, stream: str) -> bool:
        # Only a stream published to now: not a deleted deployment's, nor one of an earlier
        # partition count, nor one without a state (purged, they must stay gone).
        state = self.states.get(self._streams.get(stream, ""))
        return state is not None and not state.deleted_ms and stream in state.published_streams

    def process(self, batch: Batch) -> int:
        """One fsynced write per deployment, one pipelined ack, then retention. Returns the
        number of records archived."""
        self.stats.reclaimed += batch.claimed
        archived = self._archive(batch.entries) if batch.entries else 0
        if not batch.entries:
            self.detectors.judge_kept()
            self.detectors.claim_alone()
        self._publish()
        self.stats.trimmed += self.retention.run(self._streams, self.aside)
        return archived

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        """Every failure is ridden out: a dead log bin silently stops the archive. Only a name
        lost to another log bin stops this one (two under one name archive each other's
        pending entries)."""
        if isinstance(exc, NameLost):
            log.critical("logbin: %s", exc)
            self.name_lost = exc
            return False
        if isinstance(exc, REDIS_DOWN):
            self.retry_log.failed(f"redis unavailable ({exc})", retry_in_s)
        elif refused := refused_for_a_while(exc):
            self._say_once_a_minute(f"Redis refuses writes: {refused}")
            self._failing_redis = True
        elif isinstance(exc, OSError):
            self._say_once_a_minute(f"archive write failed: {exc}")
            self._failing_redis = False
        else:
            log.error("logbin: unexpected error; retry in %.2fs", retry_in_s, exc_info=exc)
            self.stats.failing = f"{type(exc).__name__}: {exc}"[:500]
            self._failing_redis = False
        self.stats.errors += 1
        if self.stats.failing:  # say so now: no ack round trip carries the counters meanwhile
            with contextlib.suppress(redis.RedisError):
                self.client.hset(names.LOGBIN_STATS, self.consumer, self.stats_json(time.time()))
        return True

    def _say_once_a_minute(self, failing: str) -> None:
        """Log a failure that lasts once a minute, not at every try (four a second), and
        publish it (``/readyz``, the metrics)."""
        failing = failing[:500]
        if failing != self._said_failing or time.monotonic() >= self._say_failing_at:
            self._say_failing_at = time.monotonic() + 60.0
            log.error("logbin: %s; retrying up to every %.2fs", failing, BACKOFF_MAX_S)
        self.stats.failing = self._said_failing = failing

    def close(self) -> None:
        """Close the writer and remove our published counters (so they leave ``/metrics`` at
        once, where a killed process's only go stale)."""
        self.writer.close()
        if self.name_lost is None:  # else the counters and the name are the other bin's now
            self.unpublish()
        if self.owner_token is not None and self.name_lost is None:
            let_go(self.client, self.consumer, self.owner_token)
        super().close()

    def unpublish(self) -> None:
        """Remove our counters from ``LOGBIN_STATS`` (best effort: Redis may be down)."""
        try:
            self.client.hdel(names.LOGBIN_STATS, self.consumer)
        except REDIS_FAILURES as exc:
            log.warning("logbin: could not remove its stats: %s", exc)

    def stats_json(self, now_s: float) -> str:
        return json.dumps({"ts": now_s, **dataclasses.asdict(self.stats)})

    def _publish(self) -> None:
        """Counters on their own when no ack round trip carried them (an idle bin)."""
        now = self.heartbeat_due()
        if now is not None:
            replies = self.bus.execute(self._beat(now))
            self._counters_sent(replies[0])
            self._renewed(replies[1:])

    def _refresh(self) -> None:
        """The deployments to archive (the loop creates their groups and re-reads pending)."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        try:
            deployments = self._source() if callable(self._source) else self._source
            states = self.states.read(deployments)
        except UNREACHABLE as exc:
            # A node that holds the deployment list or a state is away (a master lost, its
            # replica being elected): archive the streams known meanwhile, and ask again soon.
            self._refresh_log.failed(f"{exc}; archiving as before")
            self._next_refresh = now + ASIDE_S
            return
        self._refresh_log.succeeded()
        wanted: dict[str, str] = {}
        specs: dict[str, FeatureSpec] = {}
        for dep, state in states.items():
            for stream in state.input_streams if state else [names.input_stream(dep)]:
                wanted[stream] = dep
            if state is not None and not state.deleted_ms:  # no drift judged while draining
                specs[dep] = state.feature_spec
        if self.watch is not None:
            self.detectors.adopt(self.watch.follow(specs))
        for dep in sorted({d for s, d in wanted.items() if s not in self._streams}):
            log.info("logbin: archiving deployment %s", dep)
        self._streams = wanted
        self._stream_keys = tuple(wanted)
        self._next_refresh = now + self.refresh_s
        if self.purger is not None:
            purged = self.purger.look([s for s in states.values() if s is not None])
            if purged:  # read no more (another bin's reads find the streams gone)
                self._streams = {k: d for k, d in wanted.items() if d not in purged}
                self._stream_keys = tuple(self._streams)
        self.writer.close_all_but(set(self._streams.values()))

    # -- archiving ----------------------------------------------------------------------------

    def _archive(self, entries: list[Entry]) -> int:
        archived_ms = time.time() * 1000
        records: dict[str, list[str]] = {}
        ids: dict[str, list[bytes]] = {}
        undecodable: dict[str, int] = {}
        envelopes: dict[str, list[RequestEnvelope]] = {}
        for stream, entry_id, fields in entries:
            dep = self._streams[stream]
            # Entry ids are unique within a stream: a partition's records say which it is.
            where = "" if stream == names.input_stream(dep) else stream
            line, env = archive_line(dep, text(entry_id), fields, archived_ms, where)
            undecodable[stream] = undecodable.get(stream, 0) + (env is None)
            if env is not None:
                envelopes.setdefault(stream, []).append(env)
            records.setdefault(stream, []).append(line)
            ids.setdefault(stream, []).append(entry_id)
        written: dict[str, int] = {}
        """Stream -> how many of its records (the first ones) are on disk."""
        error: OSError | None = None
        try:
            for stream, batch in records.items():
                written[stream], error = self._write_leading(self._streams[stream], batch)
                if error is not None:
                    break
        finally:
            # Ack what is on disk even if a later deployment's write failed. Counted before
            # the ack so that the counters riding in the ack's round trip include this batch.
            written = {s: n for s, n in written.items() if n}
            if written:
                whole = [s for s, n in written.items() if n == len(ids[s])]
                if len(whole) == len(records):
                    if self.stats.failing:  # the log tells the end of a failure, not only its start
                        log.warning("logbin: archiving again (it failed: %s)", self.stats.failing)
                    self.stats.failing = self._said_failing = ""
                    self._failing_redis = False
                self.stats.records += sum(written.values())
                self.stats.undecodable += sum(undecodable[s] for s in whole)
                self.stats.batches += 1
                self.detectors.observe(self._by_deployment(envelopes, whole))
                self._ack({s: ids[s][:n] for s, n in written.items()})
                self.retention.archived(written)
        if error is not None:
            raise error  # the rest waits, pending, for the next try
        return len(entries)

    def _by_deployment(
        self, envelopes: dict[str, list[RequestEnvelope]], streams: list[str]
    ) -> dict[str, list[RequestEnvelope]]:
        """The decoded requests of ``streams`` (those archived whole), by deployment: a
        deployment's partitions are one population for the detectors."""
        by_dep: dict[str, list[RequestEnvelope]] = {}
        for stream in streams:
            by_dep.setdefault(self._streams[stream], []).extend(envelopes.get(stream, []))
        return by_dep

    def _write_leading(self, deployment: str, lines: list[str]) -> tuple[int, OSError | None]:
        """Write ``lines`` as one member or, where the disk has no room for that many (a batch
        of 512 large requests may need a hundred megabytes), as many of the first ones as it
        has room for, halving; returns how many are on disk and the disk's error if not all.
        A disk with less room than one batch left the archive stuck until a person made more
        (found by a helper's probe)."""
        try:
            self.stats.bytes_written += self.writer.append_batch(deployment, lines)
            return len(lines), None
        except OSError as exc:
            if exc.errno != errno.ENOSPC or len(lines) == 1:
                return 0, exc
        half = len(lines) // 2
        first, error = self._write_leading(deployment, lines[:half])
        if error is not None:
            return first, error
        rest, error = self._write_leading(deployment, lines[half:])
        return first + rest, error

    def _ack(self, ids: dict[str, list[bytes]]) -> None:
        """All acks of a batch in one round trip, after the data is fsynced; the counters
        and the feature alerts' claims ride along when due, so a busy bin publishes them at no
        extra round trip. All of it goes through the consumer's router, which gives up on a
        lost node within ``LOST_NODE_WAIT_S`` (redis-py's cluster pipeline retried it until
        the election ended: the archive stalled ~3 s). A failed claim is the watch's to log; a
        failed ack is raised."""
        group = self.members[0].group_b  # the log bin reads one group
        commands = [command(b"XACK", stream.encode(), group, *entry_ids)
                    for stream, entry_ids in ids.items()]  # fmt: skip
        now = self.heartbeat_due()
        if now is not None:
            commands += self._beat(now)
        own = len(commands)
        queued = self.detectors.queue(commands)
        try:
            replies = self.bus.execute(commands)
        except Exception:
            self.detectors.unsent(queued)
            raise
        raise_first_error(replies[: len(ids)])
        self.detectors.replies(queued, replies[own:])
        if now is not None:
            self._counters_sent(replies[len(ids)])
            self._renewed(replies[len(ids) + 1 : own])

    def _beat(self, now_s: float) -> list[Command]:
        """The counters, then the renewal of the hold on the consumer name (``_renewed``)."""
        beat = [self._counters(now_s)]
        if self.owner_token is not None:
            beat.append(renewal(self.consumer, self.owner_token))
        return beat

    def _renewed(self, replies: list[Any]) -> None:
        """The renewal's reply (when it rode along): another log bin holds the name now."""
        if self.owner_token is not None and replies:
            gone = lost(replies[0], self.consumer)
            if gone is not None:
                raise gone

    def _counters(self, now_s: float) -> Command:
        return command(b"HSET", names.LOGBIN_STATS.encode(), self.consumer.encode(),
                       self.stats_json(now_s).encode())  # fmt: skip

    def _counters_sent(self, reply: Any) -> None:
        """The counters' node may be away while the streams' answer (a master lost, its
        replica being elected): they are sent again when next due."""
        if isinstance(reply, UNREACHABLE):
            log.warning("logbin: cannot publish its counters now: %s", reply)
        elif isinstance(reply, Exception):
            raise reply
        elif self._failing_redis:  # a write Redis took: the next counters say it no longer fails
            self.stats.failing = ""
            self._failing_redis = False
