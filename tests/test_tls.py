"""``rediss://`` with a user and a password, as managed Redis services ask: the gateway, both
workers and the log bin reach a real Redis through TLS, as an ACL user that is not the default,
trusting a private CA through ``SSL_CERT_FILE``. The suite's redis-server is built without TLS,
so a TLS terminator of the test's own (``tls_proxy``, on trustme's certificates) stands in front
of it. A wrong password or an untrusted certificate ends a command at once, naming the cause,
instead of being retried as if Redis were still starting."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from models.archive import ArchiveReader
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import launch_system, rdv_env, wait_until
from rendezvous.bus.connection import connect
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.schedule import Schedule
from tls_proxy import TlsProxy

USER, PASSWORD = "rdv-tls", "s3cret-tls"
SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=2000, fallbacks=("canary",), grace_ms=100)


@dataclass
class TlsRedis:
    url: str
    ca_file: Path
    proxy: TlsProxy


@pytest.fixture(scope="module")
def tls_redis(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRedis]:
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("tls")
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    plain = redis.Redis.from_url(redis_server.url)
    plain.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "&*",
                          "+@all")  # fmt: skip
    try:
        with TlsProxy(context, redis_server.port) as proxy:
            url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("SSL_CERT_FILE", str(ca_file))  # this process's own clients
                yield TlsRedis(url, ca_file, proxy)
    finally:
        plain.execute_command("ACL", "DELUSER", USER)
        plain.close()


def test_gateway_workers_and_log_bin_run_over_tls_as_an_acl_user(
    tls_redis: TlsRedis,
    redis_server: EmbeddedRedis,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    x = demo_data().x_test[:5]
    with launch_system(tls_redis.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       SSL_CERT_FILE=str(tls_redis.ca_file)) as system:  # fmt: skip
        system.start_worker("real")
        system.start_worker("canary")
        sent = []
        for i, row in enumerate(x):
            rid = f"tls-{i}"
            body = {"features": dict(zip(demo_data().names, map(float, row), strict=True))}
            resp = system.predict(body, **{"X-Request-Id": rid})
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"]["role"] == "real"
            sent.append(rid)

        def archived() -> set[str] | None:
            reader = ArchiveReader(system.data_dir / "logbin")
            ids = {r["request_id"] for r in reader.records(DEMO_DEPLOYMENT)}
            return ids if set(sent) <= ids else None

        wait_until(archived, 15, "the log bin's archive of the TLS requests")
        # Every process is a client of the ACL user, through the terminator; none is the
        # default user on the plain port.
        plain = redis.Redis.from_url(redis_server.url)
        try:
            clients = plain.client_list()
        finally:
            plain.close()
        ours = [c for c in clients if c["user"] == USER]
        assert len(ours) >= 4, clients  # gateway, real, canary, log bin at least
        assert tls_redis.proxy.connections >= len(ours)


def _rdv_decisions(url: str, env_extra: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    """``rdv decisions``: a CLI command that reads Redis itself."""
    env = rdv_env(url, tmp, 0, **env_extra)
    argv = [sys.executable, "-m", "gateway.cli", "decisions", "--deployment", DEMO_DEPLOYMENT]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_a_wrong_password_or_an_untrusted_certificate_fails_at_once_naming_it(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    wrong = tls_redis.url.replace(PASSWORD, "not-the-password")
    t0 = time.monotonic()
    with pytest.raises(redis.AuthenticationError):
        connect(wrong, wait_s=20)
    assert time.monotonic() - t0 < 5, "a refusal is not retried"

    done = _rdv_decisions(wrong, {"SSL_CERT_FILE": str(tls_redis.ca_file)}, tmp_path)
    assert done.returncode != 0
    assert "refused" in done.stderr and "password" in done.stderr, done.stderr[-2000:]
    assert PASSWORD not in done.stderr and "not-the-password" not in done.stderr

    stranger = trustme.CA()  # a CA this client was not told to trust
    untrusted = tmp_path / "other-ca.pem"
    stranger.cert_pem.write_to_path(str(untrusted))
    t0 = time.monotonic()
    done = _rdv_decisions(tls_redis.url, {"SSL_CERT_FILE": str(untrusted)}, tmp_path)
    assert time.monotonic() - t0 < 15
    assert done.returncode != 0
    assert "certificate" in done.stderr, done.stderr[-2000:]
