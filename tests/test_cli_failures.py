"""What a person starting ``rdv`` reads when something is wrong: one line naming it, never a
traceback, and a process that exits rather than lingering (real processes; found by hand)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from processes import free_port
from rendezvous import names

ROOT = Path(__file__).parents[1]


def rdv(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]  # fmt: skip


def base_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "RDV_DATA_DIR": str(tmp_path)}


@pytest.mark.parametrize(
    "setting, says",
    [
        ("RDV_PORT=abc", "RDV_PORT='abc': Input should be a valid integer"),
        ("RDV_MAX_ROWS=-1", "RDV_MAX_ROWS='-1': Input should be greater than or equal to 1"),
        ("RDV_FALLBACKS=notjson", "RDV_FALLBACKS='notjson': not valid JSON"),
        ("RDV_LOG_LEVEL=chatty", "RDV_LOG_LEVEL='chatty': one of DEBUG"),
        ('RDV_DRIFT_THRESHOLDS={"nope": 1}', "unknown threshold 'nope'"),
        ('RDV_DRIFT_THRESHOLDS={"score_psi": "x"}', "RDV_DRIFT_THRESHOLDS[score_psi]='x'"),
        ("RDV_DRIFT_MIN_REQUESTS=5000", "more than the drift window holds"),
        ("RDV_PORT=99999", "RDV_PORT='99999': Input should be less than or equal to 65535"),
        ("RDV_REDIS_URL=garbage://", "RDV_REDIS_URL='garbage://': Redis URL must specify"),
        ("RDV_REDIS_URL=redis://u:secret@h:abc", "RDV_REDIS_URL='redis://***@h:abc': cannot be"),
        # parts of a password with a '/', '#' or '?' in it were printed (a helper's probe)
        ("RDV_REDIS_URL=redis://u:Pw1/Pw2@h:1/0", "percent-encode '/', '?', '#', '@' and ':'"),
        ("RDV_REDIS_URL=redis://u:12#x@h:1/0", "a '#' in the URL: percent-encode it"),
        ("RDV_REDIS_URL=redis://u:Pw?x@h:1/0", "percent-encode"),
        ("RDV_REDIS_URL=redis://user/Pw:Pw@h:1/0", "an '@' after the host: percent-encode"),
        ("RDV_ADMIN_TOKEN=t\u00f6k", "RDV_ADMIN_TOKEN=(hidden): printable ASCII"),
        ('RDV_ALERT_WEBHOOKS=["alerts.internal/hook"]', "RDV_ALERT_WEBHOOKS[0]="),
        ("RDV_PUBLIC_URL=ftp://rdv.example", "is not an http(s) URL"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, setting: str, says: str) -> None:
    """Each printed a pydantic traceback of 14-38 lines; a bad ``RDV_DRIFT_THRESHOLDS`` even
    let ``rdv serve`` start gateways that then hung, serving nothing."""
    name, _, value = setting.partition("=")
    done = rdv(["models", "list"], {**base_env(tmp_path), name: value})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("rdv models: invalid configuration: ") and says in line, line
    if name == "RDV_REDIS_URL":
        assert not any(part in line for part in ("secret", "Pw", "12")), line


@pytest.mark.parametrize(
    "setting, says",
    [
        ("RDV_REDIS_TIMEOUT_S=inf", "RDV_REDIS_TIMEOUT_S='inf': Input should be a finite number"),
        ("RDV_FEEDBACK_RETENTION_S=inf", "a finite number"),
        ("RDV_REPLY_MAXLEN=99999999999999999999999", "no setting needs so large a number"),
        ("RDV_WORKER_BLOCK_MS=99999999999999999999999", "no setting needs so large a number"),
        ('RDV_FALLBACKS=["real"]', "real cannot be its own fallback"),
        ("RDV_REAL_DEADLINE_MS=2000", "need 0 < real_deadline_ms <= timeout_ms"),
        ("RDV_LOG_LEVEL=NOTSET", "RDV_LOG_LEVEL='NOTSET': one of DEBUG"),
        ("RDV_HOST=", "RDV_HOST='': String should have at least 1 character"),
        ("RDV_DATA_DIR= ", "RDV_DATA_DIR=' ': empty: name a folder"),
        ("RDV_MAX_ROLE_LAG=300000", "not below RDV_MAX_BACKLOG=200000"),
        ("RDV_HEARTBEAT_TIMEOUT_S=1", "a live worker may go 3.5 s between heartbeats"),
        ("RDV_WORKER_BLOCK_MS=20000", "a live worker may go 21.5 s between heartbeats"),
        ("RDV_MODEL_MEMORY_MB=100", "0 (no bound) or at least 256"),
        ("RDV_WATCHDOG_S=30", "RDV_MODEL_RUN_LIMIT_S=30 s in one model run: give more than 35"),
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
        # passed, then a TypeError traceback at every command's first connection (a probe)
        ("RDV_REDIS_URL=redis://127.0.0.1:6379/0?timeout=5", "unknown option 'timeout'"),
        ("RDV_REDIS_URL=redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "needs rediss://"),
        ("RDV_REDIS_URL=redis://127.0.0.1:6379/0?decode_responses=true", "replies as bytes"),
        # refused, but as "printable ASCII characters only"
        ("RDV_ADMIN_TOKEN=", "RDV_ADMIN_TOKEN=(hidden): empty: give a token, or leave"),
        ("RDV_FEEDBACK_TOKEN= ", "RDV_FEEDBACK_TOKEN=(hidden): empty"),
        # refused under RDV_FALLBACKS' name alone, which was not at fault; then led by
        # "RDV_FALLBACKS='[\"canary\"]': " (a helper's README probe)
        ("RDV_REAL_DEADLINE_MS=2000", "invalid configuration: the default schedule "
         "(RDV_REAL_DEADLINE_MS=2000, RDV_TIMEOUT_MS=1000, RDV_GRACE_MS=200, "
         'RDV_FALLBACKS=["canary"]) is not one'),
    ],
)  # fmt: skip
def test_a_setting_that_would_fail_later_fails_at_once(
    setting: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each passed the settings' checks, then failed inside a child process (a gateway's start,
    a worker, the log bin) over and over, or served wrongly (readiness flapping, an unnamed
    listening address), while ``rdv serve`` stayed up (found by a helper's probe of every
    setting). In process: the command line's one-line path is the test above."""
    from gateway.settings import Settings
    from gateway.settings_values import invalid_settings

    name, _, value = setting.partition("=")
    monkeypatch.setenv(name, value)
    with pytest.raises(Exception) as refused:
        Settings()
    line = invalid_settings(refused.value)
    assert line is not None and says in line, line


def test_log_level_names_are_taken_as_uvicorn_takes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import Settings

    monkeypatch.setenv("RDV_LOG_LEVEL", "warn")
    assert Settings().log_level == "WARNING"


REFUSED_START = """
import gateway.transport.jobs as jobs

async def refuse(app, settings):
    raise ConnectionError("Redis went away during the start")

jobs.start = refuse
"""
"""A ``sitecustomize`` that makes every gateway process's start fail (spawned ones too)."""


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_gateway_whose_start_fails_exits_with_a_failure(
    tmp_path: Path, redis_url: str, processes: str
) -> None:
    """A start that failed after the reply reader started left the process alive after
    uvicorn's "Application startup failed" (the reader's blocked read outlived the loop's
    cancellation), so no supervisor saw it die. With several processes, uvicorn's supervisor
    stopped them all and ``rdv gateway`` exited 0, so a service manager never restarted it.
    Here the jobs' start fails, as a start that meets a Redis going away would."""
    (tmp_path / "sitecustomize.py").write_text(REFUSED_START)
    env = {**base_env(tmp_path), "RDV_REDIS_URL": redis_url, "RDV_GATEWAY_PROCESSES": processes,
           "PYTHONPATH": str(tmp_path)}  # fmt: skip
    started = time.monotonic()
    done = rdv(["gateway", "--port", str(free_port())], env)
    assert "Application startup failed" in done.stderr
    assert done.returncode == 3 and time.monotonic() - started < 30, done.stderr[-2000:]


def test_a_gateway_out_of_reach_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        labels = tmp_path / "labels.csv"
        labels.write_text("request_id,label\nr-1,1\n")
        done = rdv(["feedback", "--deployment", "d", "--url", url, "--retry-for", "0",
                    str(labels)], base_env(tmp_path))  # fmt: skip
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"cannot reach the gateway at {url}: [Errno 111] Connection refused; 0 labels were "
            "accepted before it (sending them again is safe)"
        )
        env = {**base_env(tmp_path), "RDV_ADMIN_TOKEN": "t"}
        done = rdv(["models", "list", "--url", url], env)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().startswith(f"cannot reach the gateway at {url}")


def test_decisions_of_a_deployment_that_is_not_there_are_one_line(
    tmp_path: Path, redis_url: str
) -> None:
    """Found by hand: a bad name or a negative --limit ended in a traceback, and a deployment
    that does not exist printed nothing at all."""
    env = {**base_env(tmp_path), "RDV_REDIS_URL": redis_url}
    for args, code, says in [
        (["--deployment", "nope"], 1, "rdv decisions: deployment 'nope' does not exist"),
        (["--deployment", "Not Valid"], 2, "argument --deployment: invalid deployment 'Not"),
        (["--deployment", "nope", "--limit", "-5"], 2, "argument --limit: -5 is less than 0"),
    ]:
        done = rdv(["decisions", *args], env)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
        assert says in done.stderr.strip().splitlines()[-1], done.stderr
    done = rdv(["archive", "read", "--limit", "-1"], env)
    assert done.returncode == 2 and "argument --limit: -1 is less than 0" in done.stderr


def test_decisions_limit_zero_prints_every_record_oldest_first(
    r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--limit 0`` was a usage error, where ``rdv archive read --limit 0`` means all; it now
    reads the whole stream a page at a time (more records here than a page)."""
    from gateway.cli import readers
    from gateway.cli.main import main
    from rendezvous.decision import DecisionRecord

    monkeypatch.setenv("RDV_REDIS_URL", redis_url)
    monkeypatch.setattr(readers, "DECISIONS_PAGE", 7)
    r.sadd(names.DEPLOYMENTS_SET, "d")
    for i in range(23):
        rec = DecisionRecord(request_id=f"r-{i}", deployment="d", ts_ms=float(i), outcome="timeout",
                             chosen_role=None, answered_after_ms=1.0, outputs={}, missing=(),
                             divergences={})  # fmt: skip
        r.xadd(names.decisions_stream("d"), rec.encode())  # type: ignore[arg-type]
    shown = {}
    for limit in ("0", "5"):
        main(["decisions", "--deployment", "d", "--limit", limit])
        shown[limit] = [
            json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()
        ]
    assert shown["0"] == [f"r-{i}" for i in range(23)]
    assert shown["5"] == [f"r-{i}" for i in range(18, 23)]


def test_archive_commands_name_what_is_missing_in_one_line(tmp_path: Path) -> None:
    """Found by a helper's probe: ``rdv archive read`` of a deployment with nothing archived
    printed nothing, and an export to a folder that does not exist ended in a traceback."""
    from models.archive import SegmentWriter

    writer = SegmentWriter(tmp_path / "logbin")
    writer.append_batch("d", [{"request_id": "r-0", "ts_ms": 0, "features": [[1.0]]}])
    writer.close()
    env = base_env(tmp_path)
    for action in ("read", "list"):
        done = rdv(["archive", action, "--deployment", "nope"], env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"rdv archive {action}: nothing archived of deployment 'nope' under "
            f"{tmp_path / 'logbin'} (archived: d)"
        )
    assert rdv(["archive", "read", "--deployment", "d"], env).stdout.count("r-0") == 1
    done = rdv(
        ["archive", "export", "--deployment", "d", "--out", "/nonexistent/x.csv"],
        {**env, "RDV_REDIS_URL": "redis://127.0.0.1:1"},
    )  # checked before Redis is asked
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "rdv archive export: --out /nonexistent/x.csv: no folder /nonexistent"
    )


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    """``rdv archive read | head`` ended in a BrokenPipeError traceback."""
    from models.archive import SegmentWriter

    writer = SegmentWriter(tmp_path / "logbin")
    writer.append_batch("d", [{"request_id": f"r-{i}", "ts_ms": i, "features": [[1.0]]}
                              for i in range(20_000)])  # fmt: skip
    writer.close()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "archive", "read"],
                            env=base_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100)
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_redis_that_answers_nothing_fails_a_command_in_one_line_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that takes the connection but answers nothing (stopped, or its packets dropped
    on the way): ``rdv decisions`` waited for good, as did a gateway's start, since their
    clients had no socket timeout. Every synchronous client's commands are bounded now
    (``SOCKET_TIMEOUT_S``, 1 s here): the command ends with the usual line."""
    import rendezvous.bus.connection as connection
    from gateway.cli.main import main

    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 1.0)
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel takes connections; no reply
    monkeypatch.setenv("RDV_REDIS_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}")
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["decisions", "--deployment", "breast-cancer", "--limit", "1"])
    finally:
        silent.close()
    assert "did not answer" in str(exited.value.code), exited.value.code
    assert time.monotonic() - started < 20


def test_a_worker_host_for_a_deployment_that_is_not_there_says_so(
    tmp_path: Path, redis_url: str
) -> None:
    """``rdv worker --deployment nope`` served nothing for ever and said only "serving nothing
    yet" (found by a helper's probe): a mistyped name now gets a warning, and the host goes on
    waiting for it (a deployment may be created after its workers start)."""
    log = tmp_path / "worker.log"
    env = {**base_env(tmp_path), "RDV_REDIS_URL": redis_url}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--deployment",
                                 "no-such-deployment"], env=env, cwd=ROOT, stderr=out)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "does not exist" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "deployment 'no-such-deployment' does not exist (yet)" in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
