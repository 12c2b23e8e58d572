"""``rediss://`` with a user and a password, as managed Redis services ask: the gateway, both
workers and the log bin reach a real Redis (a single node, and a cluster whose nodes announce
TLS ports) through TLS, as an ACL user that is not the default, trusting a private CA through
``SSL_CERT_FILE``. The suite's redis-server is built without TLS, so TLS terminators of the
test's own (``tls_proxy``, on trustme's certificates) stand in front of it. A wrong password or
an untrusted certificate ends a command at once, naming the cause, instead of being retried as
if Redis were still starting."""

from __future__ import annotations

import contextlib
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
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.schedule import Schedule
from tls_proxy import TlsProxy

USER, PASSWORD = "rdv-tls", "s3cret-tls"
SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=2000, fallbacks=("canary",), grace_ms=100)


@dataclass
class TlsRedis:
    url: str
    ca_file: Path
    proxies: list[TlsProxy]
    home: TlsProxy | None = None
    """On the cluster: the terminator of the node that holds the demo deployment's streams
    (every process of the system reads or writes them), which is not the URL's node."""

    @property
    def proxy(self) -> TlsProxy:
        return self.proxies[0]


@dataclass
class Certificates:
    ca_file: Path
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    """A private CA and a server certificate for 127.0.0.1; this process trusts the CA."""
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(ca_file))  # this process's own clients
        yield Certificates(ca_file, context)


def _add_user(node: redis.Redis) -> None:
    node.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "&*",
                         "+@all")  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(redis_server: EmbeddedRedis, certificates: Certificates) -> Iterator[TlsRedis]:
    plain = redis.Redis.from_url(redis_server.url)
    _add_user(plain)
    try:
        with TlsProxy(certificates.server, redis_server.port) as proxy:
            url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0"
            yield TlsRedis(url, certificates.ca_file, [proxy])
    finally:
        plain.execute_command("ACL", "DELUSER", USER)
        plain.close()


@pytest.fixture(scope="module")
def tls_cluster(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRedis]:
    """A three-master cluster of its own (no replicas) whose nodes announce the ports of their
    TLS terminators, as a managed cluster announces its TLS endpoints: a client that follows
    ``CLUSTER SLOTS`` or a ``MOVED`` only ever reaches a node through TLS."""
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(
            LocalCluster(tmp_path_factory.mktemp("tls-cluster"), replicas_per_master=0)
        )
        proxies = {port: stack.enter_context(TlsProxy(certificates.server, port))
                   for port in cluster.nodes}  # fmt: skip
        for port, proxy in proxies.items():
            node = cluster.client(port)
            _add_user(node)
            node.config_set("cluster-announce-bus-port", port + 10000)
            node.config_set("cluster-announce-port", proxy.port)
            node.execute_command("CONFIG", "REWRITE")
            node.close()
            # A node takes its own announced port at start (Redis 6.2): restart it on the
            # rewritten configuration, its slots and id kept in its nodes.conf.
            cluster.kill(port)
            cluster.restart(port)
            node = cluster.client(port)
            _add_user(node)  # users live in memory: the restart forgot it
            node.close()
        cluster.wait_healthy(20.0)
        announced = {p.port for p in proxies.values()}

        def everywhere() -> bool:
            for port in cluster.nodes:
                node = cluster.client(port)
                try:
                    seen = {int(n[1]) for s in node.execute_command("CLUSTER", "SLOTS")
                            for n in s[2:]}  # fmt: skip
                finally:
                    node.close()
                if seen != announced:
                    return False
            return True

        wait_until(everywhere, 15, "every node announcing the TLS ports")
        node = cluster.client(cluster.nodes[0])
        try:
            slot = node.execute_command("CLUSTER", "KEYSLOT", names.input_stream(DEMO_DEPLOYMENT))
            home_port = next(int(s[2][1]) for s in node.execute_command("CLUSTER", "SLOTS")
                             if s[0] <= slot <= s[1])  # fmt: skip
        finally:
            node.close()
        home = next(p for p in proxies.values() if p.port == home_port)  # announced: TLS ports
        url_port = next(p.port for p in proxies.values() if p.port != home_port)
        yield TlsRedis(f"rediss://{USER}:{PASSWORD}@127.0.0.1:{url_port}",
                       certificates.ca_file, list(proxies.values()), home)  # fmt: skip


def test_gateway_workers_and_log_bin_run_over_tls_as_an_acl_user(
    tls_redis: TlsRedis,
    redis_server: EmbeddedRedis,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with _serving_over_tls(tls_redis, demo_data_dir, tmp_path_factory):
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


def test_the_same_on_a_cluster_that_announces_tls_ports(
    tls_cluster: TlsRedis, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each process finds the node of the deployment's streams through the cluster's topology
    and reaches it through its terminator."""
    with _serving_over_tls(tls_cluster, demo_data_dir, tmp_path_factory):
        print("connections by node", [p.connections for p in tls_cluster.proxies])
        # The URL names another node: the deployment's node was found through the cluster's
        # topology, at its announced TLS port, by each of gateway, real, canary and log bin.
        assert tls_cluster.home is not None and tls_cluster.home.connections >= 4


@contextlib.contextmanager
def _serving_over_tls(
    tls: TlsRedis, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Five predicts through a gateway with both workers, all answered by real and archived
    by the log bin, every process on ``tls.url``; then the system is still up."""
    x = demo_data().x_test[:5]
    with launch_system(tls.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       SSL_CERT_FILE=str(tls.ca_file)) as system:  # fmt: skip
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
        yield


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
    # a private CA named in the URL, for Redis alone (README; SSL_CERT_FILE takes it for every
    # HTTPS call of the process, alert webhooks too): answered, and the untrusted one named
    ok = _rdv_decisions(f"{tls_redis.url}?ssl_ca_certs={tls_redis.ca_file}", {}, tmp_path)
    # read over TLS (the deployment exists once the served tests made it)
    assert ok.returncode == 0 or "does not exist" in ok.stderr, ok.stderr[-2000:]
    assert "ssl_ca_certs" in done.stderr  # the hint names the URL option
