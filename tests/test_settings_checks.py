"""Settings a fuzzing probe of every ``RDV_`` variable found passing their checks and then
failing where they were used (a traceback in each gateway process, an outcome store that
could not flush, a Redis URL retried for 11 s before "did not answer"), or refused with a
message that blamed the wrong thing. Each is now refused at once, naming the variable."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dataplane.outcome_store import OutcomeStore

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "setting, says",
    [
        # passed, then every gateway process failed: "timestamp out of range for platform time_t"
        ("RDV_REDIS_TIMEOUT_S=1e10", "RDV_REDIS_TIMEOUT_S='1e10': Input should be less than"),
        # passed, then every read timed out at once, and the log said only "did not answer"
        ("RDV_REDIS_TIMEOUT_S=1e-9", "RDV_REDIS_TIMEOUT_S='1e-9': Input should be greater"),
        # passed, then the gateway's outcome flush failed on a list of 10^17 buckets
        ("RDV_FEEDBACK_BUCKET_S=1e-9", "RDV_FEEDBACK_BUCKET_S='1e-9': Input should be greater"),
        ("RDV_FEEDBACK_BUCKET_S=10", "would hold 60480 buckets; at most 10,000"),
        # passed, then 11 s of retries ended in "did not answer (protocol must be ...)"
        ("RDV_REDIS_URL=redis://127.0.0.1:6379?protocol=7", "protocol must be 2 or 3"),
        ("RDV_REDIS_URL=redis://127.0.0.1:6379/abc", "the database must be a number (/0)"),
        ("RDV_REDIS_URL=redis://", "names no host"),
        ("RDV_REDIS_URL=redis://127.0.0.1:0", "port 0 is no Redis's"),
        ("RDV_REDIS_URL=redis://a:1,b:0", "'redis://b:0': port 0 is no Redis's"),
        # refused, but as "printable ASCII characters only"
        ("RDV_ADMIN_TOKEN=", "RDV_ADMIN_TOKEN=(hidden): empty: give a token, or leave"),
        ("RDV_FEEDBACK_TOKEN= ", "RDV_FEEDBACK_TOKEN=(hidden): empty"),
        # refused under RDV_FALLBACKS' name alone, which was not at fault
        ("RDV_REAL_DEADLINE_MS=2000", "RDV_REAL_DEADLINE_MS=2000, RDV_TIMEOUT_MS=1000"),
    ],
)  # fmt: skip
def test_a_setting_that_passed_and_failed_later_is_refused_at_once(
    setting: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import Settings
    from gateway.settings_values import invalid_settings

    name, _, value = setting.partition("=")
    monkeypatch.setenv(name, value)
    with pytest.raises(Exception) as refused:
        Settings()
    line = invalid_settings(refused.value)
    assert line is not None and says in line, line


@pytest.mark.parametrize(
    "setting",
    ["RDV_REDIS_URL=redis://127.0.0.1:6379/2", "RDV_REDIS_URL=rediss://u:p@h:1/0?protocol=3",
     "RDV_REDIS_URL=unix:///tmp/redis.sock", "RDV_FEEDBACK_BUCKET_S=61",
     "RDV_REDIS_TIMEOUT_S=0.05"],
)  # fmt: skip
def test_the_values_beside_them_still_pass(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import Settings

    name, _, value = setting.partition("=")
    monkeypatch.setenv(name, value)
    Settings()


def test_the_live_buckets_are_a_range_not_a_list() -> None:
    """Whatever the retention spans, its buckets are never listed one by one."""
    store = OutcomeStore(None, retention_s=7 * 24 * 3600, bucket_s=60, max_bytes=10**9)  # type: ignore[arg-type]
    live = store.live_buckets(now_ms=1_800_000_000_000)
    assert isinstance(live, range) and len(live) == 7 * 24 * 60 + 1
    assert live[0] == 1_800_000_000 // 60 and list(live[:2]) == [live[0], live[0] - 1]


def test_a_gateway_that_cannot_listen_says_where(tmp_path: Path, redis_url: str) -> None:
    """uvicorn said "ERROR: [Errno 98] Address already in use" and exited 3, naming neither the
    address nor the setting (``rdv serve`` did)."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        env = {"PATH": "/usr/bin:/bin", "RDV_DATA_DIR": str(tmp_path), "RDV_PORT": str(port),
               "RDV_REDIS_URL": redis_url}  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "gateway"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        taken.close()
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"rdv gateway: cannot listen on 127.0.0.1:{port}: "), line
    assert "Address already in use" in line, line
