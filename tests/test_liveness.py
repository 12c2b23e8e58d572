"""A supervised process says when its loop last made progress (``rendezvous.liveness``)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from processes import RdvProcess, rdv_env, wait_until
from rendezvous import liveness

pytestmark = pytest.mark.integration  # a real log bin process


def test_a_log_bin_says_it_makes_progress_until_it_is_stopped(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The log bin (a consumer loop, as a worker of its own process is) sets its file's time
    to its loop's last step about every second; stopped (SIGSTOP), it no longer does, which
    is what ``rdv serve``'s watchdog reads."""
    beat = str(tmp_path / "logbin.alive")
    liveness.create(beat)
    env = rdv_env(redis_url, tmp_path, 0, **{liveness.ENV: beat})
    proc = RdvProcess(["logbin", "--consumer", "liveness-test"], env, tmp_path / "logbin.log")
    try:
        wait_until(lambda: (liveness.made_progress_at(beat) or 0) > time.time() - 2, 20,
                   "the log bin's first beat")  # fmt: skip
        first = liveness.made_progress_at(beat)
        wait_until(lambda: (liveness.made_progress_at(beat) or 0) > (first or 0), 5,
                   "a later beat")  # fmt: skip
        proc.proc.send_signal(signal.SIGSTOP)
        stopped = liveness.made_progress_at(beat)
        time.sleep(2.5)
        assert liveness.made_progress_at(beat) == stopped
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        assert proc.stop() == 0, proc.log_text()[-2000:]
