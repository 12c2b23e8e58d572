"""The shared consumer loop against a real Redis server: own pending entries first after a
restart or a failure, a dead consumer's idle entries claimed, each processed once, and no
round trip of its own beyond the read."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from rendezvous.bus.consumer import Batch, ConsumerLoop, Membership, stop_thread
from rendezvous.bus.routing import Command, command, raise_first_error

pytestmark = pytest.mark.integration

GROUP = "g"
A, B = "rdv:{a}:in", "rdv:{b}:in"


class Recorder(ConsumerLoop):
    """Records every batch and acks it in one round trip of its own, or (``ahead``) ahead of
    the next read, as the worker does; ``fail`` makes the next batch fail before its ack,
    ``also_write`` rides with the next batch's acks, and ``ride_out`` retries any error."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, consumer: str,
        streams: Sequence[str] = (A,), *, ahead: bool = False, ride_out: bool = False, **kw: Any,
    ):  # fmt: skip
        kw.setdefault("batch_size", 16)
        kw.setdefault("block_ms", 50)
        kw.setdefault("claim_idle_ms", 30_000)
        kw.setdefault("heartbeat_s", 3600.0)
        super().__init__(client, group=GROUP, consumer=consumer, **kw)
        self._streams = tuple(streams)
        self.ahead = ahead
        self.ride_out = ride_out
        self.batches: list[Batch] = []
        self.fail: Exception | None = None
        self.also_write: list[Command] = []
        self.along: list[Any] = []
        self.failures: list[Exception] = []

    def failed(self, exc: Exception, retry_in_s: float) -> bool:
        self.failures.append(exc)
        return self.ride_out or super().failed(exc, retry_in_s)

    def streams_to_read(self) -> tuple[str, ...]:
        return self._streams

    def process(self, batch: Batch) -> int:
        self.along = batch.along
        if not batch.entries:
            return 0
        self.batches.append(batch)
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        acks = [command(b"XACK", stream.encode(), member.group_b, entry_id)
                for (stream, entry_id, _), member in zip(batch.entries, batch.members,
                                                         strict=True)]  # fmt: skip
        acks += self.also_write
        self.also_write = []
        if self.ahead:
            self.write_with_next_read(acks, raise_first_error)
        else:
            raise_first_error(self.bus.execute(acks))
        return len(batch.entries)

    def ids(self) -> list[tuple[str, bytes]]:
        return [
            (stream, entry_id) for batch in self.batches for stream, entry_id, _ in batch.entries
        ]


def _groups(r: redis.Redis | redis.RedisCluster, *streams: str) -> None:
    for stream in streams:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)


def _add(r: redis.Redis | redis.RedisCluster, stream: str, n: int) -> list[tuple[str, bytes]]:
    """(stream, id) of each entry added: ids are only unique within a stream."""
    return [(stream, r.xadd(stream, {b"n": b"%d" % i})) for i in range(n)]  # type: ignore[misc]


def _pending(r: redis.Redis | redis.RedisCluster, stream: str = A) -> int:
    return int(r.xpending(stream, GROUP)["pending"])


def _round_trips(loop: ConsumerLoop) -> list[int]:
    """From now on, the number of commands in each of ``loop``'s round trips."""
    round_trips: list[int] = []
    execute = loop.bus.execute

    def counted(commands: Sequence[Command], **kw: Any) -> list[Any]:
        round_trips.append(len(commands))
        return execute(commands, **kw)

    loop.bus.execute = counted  # type: ignore[method-assign]
    return round_trips


def _run_until_two_batches_and_none_pending(r: redis.Redis, loop: Recorder) -> None:
    """``loop.run`` on a thread until it processed two batches and nothing is pending (at most
    5 s), then stopped."""
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while (len(loop.batches) < 2 or _pending(r)) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        stop_thread(loop, thread, time.monotonic() + 5)
    assert not thread.is_alive()


def test_a_restarted_consumer_reads_its_own_pending_entries_first(r: redis.Redis) -> None:
    _groups(r, A)
    unacked = _add(r, A, 3)
    crashed = Recorder(r, "c1")
    crashed.fail = RuntimeError("crashed before the ack")
    with pytest.raises(RuntimeError):
        crashed.drain()
    assert _pending(r) == 3
    later = _add(r, A, 2)
    restarted = Recorder(r, "c1")  # same consumer name, as a restarted process
    assert restarted.drain() == 5
    [first, *_] = restarted.batches
    assert [(s, entry_id) for s, entry_id, _ in first.entries] == unacked  # before any new one
    assert restarted.ids() == unacked + later  # each once
    assert _pending(r) == 0


def test_a_dead_consumers_idle_entries_are_claimed_once_each(r: redis.Redis) -> None:
    _groups(r, A, B)
    dead = _add(r, A, 3) + _add(r, B, 2)
    r.xreadgroup(GROUP, "dead", {A: ">", B: ">"})  # delivered, never acked
    fresh = _add(r, A, 1)
    time.sleep(0.15)
    # Two entries per page: the claim scan of A takes two pages, both streams in each round trip.
    alive = Recorder(r, "alive", streams=(A, B), claim_idle_ms=100, batch_size=2)
    assert alive.drain() == 6
    assert sorted(alive.ids()) == sorted(dead + fresh) and len(set(alive.ids())) == 6
    assert sum(batch.claimed for batch in alive.batches) == 5
    assert _pending(r, A) == 0 and _pending(r, B) == 0


def test_an_entry_deleted_while_pending_on_a_dead_consumer_is_let_go_once(
    r: redis.Redis,
) -> None:
    _groups(r, A)
    (_, kept), (_, deleted) = _add(r, A, 2)
    r.xreadgroup(GROUP, "dead", {A: ">"})
    r.xdel(A, deleted)
    time.sleep(0.15)
    alive = Recorder(r, "alive", claim_idle_ms=100)
    assert alive.drain() == 2
    fields = {entry_id: f for batch in alive.batches for _, entry_id, f in batch.entries}
    assert alive.ids() == [(A, kept), (A, deleted)] and fields[deleted] == {}
    assert _pending(r) == 0


def test_a_failure_under_run_backs_off_and_rereads_the_pending_entries(r: redis.Redis) -> None:
    _groups(r, A)
    sent = _add(r, A, 3)
    loop = Recorder(r, "c1")
    loop.fail = redis.ConnectionError("injected: lost before the ack")
    _run_until_two_batches_and_none_pending(r, loop)
    assert loop.ids() == sent + sent  # at least once: the failed batch, then its redelivery
    assert _pending(r) == 0


def test_the_loop_adds_no_round_trip_and_answers_read_along_with_each_read(
    r: redis.Redis,
) -> None:
    _groups(r, A)
    r.set("rev", b"1")
    loop = Recorder(r, "c1", read_along=[command(b"GET", b"rev")])
    assert loop.drain() == 0  # the first step also reads its pending entries and claims
    round_trips = _round_trips(loop)
    _add(r, A, 4)
    assert loop.step(block_ms=10) == 4
    assert round_trips == [2, 4]  # the read with its GET, then the recorder's acks
    assert loop.along == [b"1"]
    round_trips.clear()
    r.set("rev", b"2")
    assert loop.step(block_ms=10) == 0
    assert round_trips == [2] and loop.along == [b"2"]  # an empty read: one round trip


def test_a_write_held_for_the_next_read_goes_in_its_round_trip(r: redis.Redis) -> None:
    """The acks of one batch go ahead of the next read, in one round trip; a drain and a stop
    send the last batch's own."""
    _groups(r, A)
    r.set("rev", b"1")
    loop = Recorder(r, "c1", ahead=True, read_along=[command(b"GET", b"rev")])
    assert loop.drain() == 0
    round_trips = _round_trips(loop)
    _add(r, A, 4)
    assert loop.step(block_ms=10) == 4
    assert round_trips == [2] and _pending(r) == 4  # read and GET; the acks are held
    _add(r, A, 2)
    assert loop.step(block_ms=10) == 2
    assert round_trips == [2, 4 + 2] and _pending(r) == 2  # the 4 acks, then the read and GET
    assert loop.drain() == 0
    assert round_trips == [2, 6, 2 + 2] and _pending(r) == 0  # the 2 acks with its read

    _add(r, A, 3)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while len(loop.batches) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    stop_thread(loop, thread, time.monotonic() + 5)
    assert not thread.is_alive() and len(loop.batches) == 3
    assert _pending(r) == 0  # the batch in hand was finished at the stop: its acks sent


def test_a_failed_held_write_fails_the_read_it_rode_with_which_is_read_again(
    r: redis.Redis,
) -> None:
    """An error in the held write is the next step's failure: the entries that step read are
    pending on us, so they are read again (our own pending entries first) and processed once."""
    _groups(r, A)
    first, then = _add(r, A, 3), _add(r, A, 3)
    r.set("not-a-number", b"x")
    loop = Recorder(r, "c1", ahead=True, ride_out=True, batch_size=3)
    loop.also_write = [command(b"INCR", b"not-a-number")]  # with the first batch's acks
    _run_until_two_batches_and_none_pending(r, loop)
    [failure] = loop.failures
    assert isinstance(failure, redis.ResponseError) and "not an integer" in str(failure)
    assert loop.ids() == first + then  # the second read, failed with the write, read again
    assert _pending(r) == 0


def test_on_a_cluster_a_blocking_read_carries_no_held_write(rc: redis.RedisCluster) -> None:
    """A held write that is redirected (its slot moving, a failover) is sent again only once
    every reply is in: behind a blocking read, a block later. So on a cluster it goes alone just
    before a read that blocks, and with a read that does not."""
    _groups(rc, A)
    loop = Recorder(rc, "c1", ahead=True)
    assert loop.drain() == 0
    round_trips = _round_trips(loop)
    _add(rc, A, 3)
    assert loop.step(block_ms=10) == 3
    _add(rc, A, 1)
    assert loop.step(block_ms=10) == 1
    assert round_trips == [1, 3, 1] and _pending(rc) == 1  # the 3 acks alone, then the read
    assert loop.drain() == 0
    assert round_trips[3:] == [1 + 1] and _pending(rc) == 0  # with a read that does not block


def _blocked(node: redis.Redis) -> int:
    return int(node.info("clients")["blocked_clients"])


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_a_stop_cuts_a_blocking_read_short_even_after_a_reconnect(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """A stopped consumer need not wait out its block (a minute here): ``stop_thread``
    interrupts the read (``CLIENT UNBLOCK``), which returns as an empty one, and the loop
    ends. The connection's client id is learnt again when it reconnects."""
    client = request.getfixturevalue("r" if kind == "single" else "rc")
    if isinstance(client, redis.RedisCluster):
        owner = client.get_node_from_key(A)
        node = redis.Redis(host=owner.host, port=owner.port)
    else:
        node = client
    _groups(client, A)
    loop = Recorder(client, "c1", block_ms=60_000)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not _blocked(node) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _blocked(node) == 1
        assert node.client_kill_filter(_type="normal", skipme=True)  # its connection too
        while not _blocked(node) and time.monotonic() < deadline:  # reconnected, blocked
            time.sleep(0.01)
        assert _blocked(node) == 1
        stop.set()
        stop_thread(loop, thread, time.monotonic() + 10)
        assert not thread.is_alive()
        assert not _blocked(node)
        assert loop.batches == []
    finally:
        stop.set()
        thread.join(timeout=65)


def test_a_user_without_client_id_or_unblock_is_served_and_stops_at_the_blocks_end(
    r: redis.Redis, redis_url: str
) -> None:
    """Managed Redis may deny ``CLIENT`` (``-@dangerous`` takes ``CLIENT UNBLOCK``): the
    consumer reads as ever, and a stop then waits out the block instead of failing."""
    r.execute_command("ACL", "SETUSER", "limited", "reset", "on", ">pw", "~*", "&*", "+@all",
                      "-client")  # fmt: skip
    limited = redis.Redis.from_url(redis_url, username="limited", password="pw")
    try:
        _groups(r, A)
        sent = _add(r, A, 2)
        loop = Recorder(limited, "c1", block_ms=300)
        stop = threading.Event()
        thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while loop.ids() != sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.ids() == sent
        stop.set()
        stop_thread(loop, thread, time.monotonic() + 10)
        assert not thread.is_alive() and _pending(r) == 0
    finally:
        limited.close()
        r.execute_command("ACL", "DELUSER", "limited")


def test_one_loop_reads_several_groups_each_at_its_own_pace(r: redis.Redis) -> None:
    """Two groups over one stream read by one loop (a worker's shadow roles): each gets
    every entry once, in the same round trips; a group that is behind is read without
    waiting out the other's blocking read; after a failure each re-reads its own pending
    entries; a dead consumer's idle entries are claimed in the group they were left in."""
    behind = _add(r, A, 5)
    r.xgroup_create(A, "h", id="0")
    r.xgroup_create(A, GROUP, id="$")  # caught up: nothing for it until the next entry
    loop = Recorder(r, "c1", block_ms=3000)
    other = Membership("h", "h1")
    loop.join(other)
    t0 = time.monotonic()
    assert loop.step(block_ms=3000) == 5 and time.monotonic() - t0 < 1.5
    assert {m.group for m in loop.batches[0].members} == {"h"}
    assert loop.step(block_ms=3000) == 0  # an empty read: the next one blocks
    both = _add(r, A, 2)
    assert loop.step(block_ms=3000) == 4  # the blocking read woke, the other rode behind it
    got = {(m.group, entry_id) for b in loop.batches for (_, entry_id, _), m in
           zip(b.entries, b.members, strict=True)}  # fmt: skip
    assert got == {("h", i) for _, i in behind + both} | {(GROUP, i) for _, i in both}
    assert _pending(r) == 0 and int(r.xpending(A, "h")["pending"]) == 0

    # A failure between the read and the acks: each group re-reads its own pending entries.
    loop.batches.clear()
    loop.fail = redis.ConnectionError("injected: lost before the ack")
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        more = _add(r, A, 3)
        deadline = time.monotonic() + 5
        while (len(loop.batches) < 2 or _pending(r) or int(r.xpending(A, "h")["pending"])) and \
                time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    ids = [(m.group, i) for b in loop.batches for (_, i, _), m in
           zip(b.entries, b.members, strict=True)]  # fmt: skip
    assert sorted(set(ids)) == sorted((g, i) for g in (GROUP, "h") for _, i in more)
    assert _pending(r) == 0 and int(r.xpending(A, "h")["pending"]) == 0

    # A dead member of group h left entries pending: claimed into h, not into GROUP.
    left = _add(r, A, 2)
    r.xreadgroup("h", "dead", {A: ">"})
    time.sleep(0.15)
    alive = Recorder(r, "c2", claim_idle_ms=100)
    alive.join(Membership("h", "h2"))
    assert alive.drain() == 4
    claimed = [(m.group, i) for b in alive.batches if b.claimed for (_, i, _), m in
               zip(b.entries, b.members, strict=True)]  # fmt: skip
    assert sorted(claimed) == sorted(("h", i) for _, i in left)
    assert _pending(r) == 0 and int(r.xpending(A, "h")["pending"]) == 0
