"""Where a deployment's archive is complete (``models.archive_frontier``), on a real Redis and a
real cluster: an export or a replay "until now" ends before the oldest request the log bin has
yet to write, so the next window finds it (a helper's probe: an export taken while the log bin
was behind lacked 661 of 13,348 records and said it covered until now)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.archive_frontier import archived_until_ms, last_archived_ms
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.envelope import RequestEnvelope

pytestmark = pytest.mark.integration


def _fields(deployment: str, enqueued_ms: float) -> dict[bytes, bytes]:
    return RequestEnvelope(
        request_id=f"r-{enqueued_ms}", deployment=deployment, reply_to="rdv:reply:{gw}",
        deadline_ms=enqueued_ms + 1000, enqueued_ms=enqueued_ms, raw=b"{}",
        features=np.zeros((1, 2), np.float32), spec_version="s",
    ).encode()  # fmt: skip


def test_the_archive_is_complete_until_the_oldest_request_the_log_bin_holds_back(
    bus_url: str,
) -> None:
    client = connect(bus_url)
    dep = f"frontier-{time.time_ns()}"
    first, second = names.input_stream(dep), names.input_stream(dep, 1, 2)
    try:
        assert archived_until_ms(client, [first, second]) is None  # no stream yet
        now_ms = time.time() * 1000
        ids = [client.xadd(first, _fields(dep, now_ms - 5000 + i)) for i in range(4)]
        # no log bin has read it yet: all of it waits, from the first request's time
        assert archived_until_ms(client, [first]) == now_ms - 5000
        client.xgroup_create(first, names.LOGBIN_GROUP, id="0")
        read = client.xreadgroup(names.LOGBIN_GROUP, "bin", {first: ">"}, count=2)
        assert len(read[0][1]) == 2
        # read, not yet written: the oldest pending one holds the archive back
        assert archived_until_ms(client, [first]) == now_ms - 5000
        client.xack(first, names.LOGBIN_GROUP, ids[0])
        assert archived_until_ms(client, [first]) == now_ms - 4999
        client.xack(first, names.LOGBIN_GROUP, ids[1])
        # all read ones written: the first one not yet read
        assert archived_until_ms(client, [first]) == now_ms - 4998
        # a partition behind further holds back the whole deployment; an entry's time is the
        # earlier of its id's and its request's (a gateway's clock behind Redis's)
        client.xadd(second, _fields(dep, now_ms - 60_000))
        client.xgroup_create(second, names.LOGBIN_GROUP, id="0")
        assert archived_until_ms(client, [first, second]) == now_ms - 60_000
        for stream in (first, second):  # partitions live in slots of their own
            client.xreadgroup(names.LOGBIN_GROUP, "bin", {stream: ">"})
            pending = client.xpending_range(stream, names.LOGBIN_GROUP, "-", "+", 10)
            client.xack(stream, names.LOGBIN_GROUP, *[p["message_id"] for p in pending])
        assert archived_until_ms(client, [first, second]) is None  # all archived
    finally:
        client.delete(first, second)
        client.close()


def test_a_window_is_capped_before_the_millisecond_of_the_first_request_not_archived() -> None:
    assert last_archived_ms(None, 2000.0) == 2000.0
    assert last_archived_ms(1500.25, 2000.0) == 1499.0  # 1500.1 may be archived, 1500.3 not
    assert last_archived_ms(5000.0, 2000.0) == 2000.0
    # less a margin for requests behind it in the stream but stamped before it (a stall)
    assert last_archived_ms(1500.25, 2000.0, margin_ms=1000) == 499
