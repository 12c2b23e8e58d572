"""Redis goes silent: its open connections answer nothing more, and are never closed (the
network between drops the packets), while new connections reach it."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from silent_proxy import SilentProxy

from models.archive import ArchiveReader
from models.train import DEMO_DEPLOYMENT
from processes import bodies, launch_system, report, wait_until
from rendezvous.bus.connection import connect
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration  # real processes


def test_workers_and_the_log_bin_come_back_from_a_redis_gone_silent(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every command a worker or the log bin sent waited for ever: their clients had no
    socket timeout, so once their connections went silent they read nothing again (under
    ``rdv serve`` until its watchdog, 120 s; else for good) while the gateway, whose commands
    are bounded, had reconnected within seconds: every request a 504. Now their commands are
    bounded by ``RDV_REDIS_TIMEOUT_S`` too: they reconnect, real answers again within seconds,
    and the log bin archives again."""
    where = urlparse(redis_url)
    assert where.hostname and where.port
    proxy = SilentProxy(where.hostname, where.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        with launch_system(url, demo_data_dir, tmp_path_factory, Schedule(),
                           RDV_REDIS_TIMEOUT_S="1") as system:  # fmt: skip
            system.start_worker("real")
            body = bodies(1)[0]
            assert system.predict(body).json()["model"]["role"] == "real"
            proxy.silence()
            silenced = time.monotonic()
            system.r = connect(url)  # the test's own client, anew (its connection is silent)
            ids = (f"after-silence-{i}" for i in itertools.count())
            answered: list[str] = []

            def answered_by_real() -> bool:
                rid = next(ids)
                resp = system.predict(body, **{"X-Request-Id": rid})
                if resp.status_code == 200 and resp.json()["model"]["role"] == "real":
                    answered.append(rid)
                return bool(answered)

            wait_until(answered_by_real, 20, "real to answer again", interval_s=0.2)
            took = time.monotonic() - silenced

            def archived() -> bool:
                records = ArchiveReader(system.data_dir / "logbin").records(DEMO_DEPLOYMENT)
                return answered[0] in {r["request_id"] for r in records}

            wait_until(archived, 20, "the log bin to archive again", interval_s=0.2)
            report("silent redis", {"answered by real again after s": round(took, 1)})
    finally:
        proxy.close()
