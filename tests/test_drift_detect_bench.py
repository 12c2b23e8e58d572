"""The drift benchmark's own parts, without a gateway: every fault changes the rows as its name
says, the offline false-alarm replay counts and bounds what it sees, and the sender's requests
all reach a server that closes its connections."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from benchmarks.drift_bench import offline_far, table
from benchmarks.drift_faults import TARGETS, Data, faults
from benchmarks.drift_sender import Sender


@pytest.fixture(scope="module")
def data() -> Data:
    return Data.load()


def test_every_fault_changes_the_rows_and_has_a_target(data: Data) -> None:
    chosen = faults(data)
    assert len(chosen) == 16 and {f.group for f in chosen} == set(TARGETS)
    names = data.names
    for fault in chosen:
        rows = fault.rows(np.random.default_rng(0), 400)
        assert rows.shape == (400, len(names)), fault.name
        if fault.group == "prior":
            continue
        normal = data.normal(np.random.default_rng(0), 400)
        changed = {names[i] for i in np.flatnonzero((rows != normal).any(axis=0))}
        assert changed and all(n in fault.name for n in changed), (fault.name, changed)
    [malignant] = [f for f in chosen if "90 % malignant" in f.name]
    rows = malignant.rows(np.random.default_rng(1), 2000)
    labels = {tuple(r): y for r, y in zip(data.x.tolist(), data.y.tolist(), strict=True)}
    assert np.mean([labels[tuple(r)] for r in rows.tolist()]) == pytest.approx(0.1, abs=0.03)


def test_offline_replay_counts_alarms_per_100k(data: Data, demo_data_dir: Path) -> None:
    far = offline_far(data, data.held_out, 20_000, seed=3, models_dir=demo_data_dir / "models")
    assert far["rows"] == 20_000 and far["alarms"] == {}
    assert far["per_100k"] == 0 and far["per_100k_upper_95"] == pytest.approx(15.0)
    text = table({"live": {}, "offline": {"held-out": far}})
    assert "0 alarms in 20,000 rows" in text


async def test_every_request_is_answered_by_a_server_that_closes_after_a_few(data: Data) -> None:
    """The gateway closes a connection after 100 answers (``rdv serve``'s
    ``RDV_REQUESTS_PER_CONNECTION``): the sender's connections died there, so a run's 3,200th
    request was its last to arrive, and no fault after the warm-up was ever judged."""
    served = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answered in range(1, 4):  # three answers, the third closing
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            served[0] += 1
            close = b"Connection: close\r\n" if answered == 3 else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + close + b"\r\n{}")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = Sender("127.0.0.1", port, 400.0, data.normal, np.random.default_rng(0),
                    connections=2, stagger_s=0.0)  # fmt: skip
    stop = asyncio.Event()
    async with server:
        running = asyncio.create_task(sender.run(stop))
        await asyncio.sleep(0.25)
        stop.set()
        await running
    assert sender.sent >= 60 and sender.statuses == {200: served[0]}
    assert served[0] >= sender.sent - 2  # all answered but those in flight at the stop
