"""``RDV_REDIS_URL`` may name several nodes of one cluster: a process that starts while one of
them is down finds the cluster through another (real cluster, real single node)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from rendezvous.bus.connection import connect, connect_async
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.urls import seed_urls

pytestmark = pytest.mark.integration


def test_each_node_keeps_the_scheme_user_password_path_and_query() -> None:
    assert seed_urls("redis://127.0.0.1:7000") == ["redis://127.0.0.1:7000"]
    url = "rediss://app:s%40cret@a.example:7000,b.example:7001/0?ssl_cert_reqs=none"
    assert seed_urls(url) == [
        "rediss://app:s%40cret@a.example:7000/0?ssl_cert_reqs=none",
        "rediss://app:s%40cret@b.example:7001/0?ssl_cert_reqs=none",
    ]
    assert seed_urls("redis://a:1,b:2,") == ["redis://a:1", "redis://b:2"]
    assert seed_urls("unix:///tmp/redis.sock") == ["unix:///tmp/redis.sock"]


def test_a_logged_url_shows_no_password() -> None:
    """Cut at the first ``@``, a password holding one (which redis-py takes) had its tail
    logged; a ``password`` in the query was logged whole (a helper's probe)."""
    from rendezvous.bus.urls import redacted

    assert (
        redacted("redis://default:Pw@Word-TAIL@127.0.0.1:6379/0") == "redis://***@127.0.0.1:6379/0"
    )
    assert redacted("redis://h:1/0?db=0&password=QS") == "redis://h:1/0?db=0&password=***"
    assert redacted("rediss://u:p@a:1,b:2/0?ssl_cert_reqs=none") == (
        "rediss://***@a:1,b:2/0?ssl_cert_reqs=none"
    )
    assert redacted("redis://h:1") == "redis://h:1"


def test_a_moved_reply_says_the_node_is_a_clusters() -> None:
    """A cluster user that may run neither INFO nor CLUSTER INFO (Redis 6's -@dangerous) was
    taken for a single node, and the MOVED reply read "did not answer" (a helper's probe)."""
    from rendezvous.bus.failures import unreachable

    said = unreachable(redis.exceptions.MovedError("14250 127.0.0.1:7002"), "redis://u:p@h:1")
    assert said is not None and "answered MOVED" in said and "+cluster|info" in said
    assert "u:p" not in said


def test_tls_and_password_failures_say_which(redis_url: str) -> None:
    """A rediss:// URL to a plain port read "did not answer... Is it running?", and a URL
    without a password to a Redis that wants one "refused the user or password" (a probe)."""
    from rendezvous.bus.failures import permanent_refusal, unreachable

    plain = redis_url.replace("redis://", "rediss://") + "?ssl_cert_reqs=none"
    with pytest.raises(redis.RedisError) as failed:  # a timeout: a plain Redis waits for more
        connect(plain, wait_s=0.3)
    said = unreachable(failed.value, plain)
    assert said is not None and "TLS handshake" in said and "plain Redis" in said, said
    wanted = permanent_refusal(redis.AuthenticationError("Authentication required."))
    assert wanted is not None and "the URL gives none" in wanted


def _dead_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_cluster_is_found_through_the_first_node_that_answers(
    redis_cluster: LocalCluster,
) -> None:
    redis_cluster.wait_healthy(30.0)
    live = redis_cluster.url.removeprefix("redis://")
    url = f"redis://127.0.0.1:{_dead_port()},{live}"
    t0 = time.monotonic()
    sync = connect(url, wait_s=5)
    client = await connect_async(url, wait_s=5)
    try:
        assert time.monotonic() - t0 < 2.0  # the dead node is passed over at once
        assert isinstance(sync, redis.RedisCluster)
        assert isinstance(client, aioredis.RedisCluster)
        keys = [f"rdv:{{seed-{i}}}:k" for i in range(12)]
        assert len({sync.get_node_from_key(k).name for k in keys}) == 3  # every master
        for key in keys:
            await client.set(key, b"v")
            assert sync.get(key) == b"v"
    finally:
        sync.close()
        await client.aclose()


def test_several_nodes_of_a_single_redis_are_refused_saying_why(redis_url: str) -> None:
    node = redis_url.removeprefix("redis://").split("/")[0]
    with pytest.raises(ValueError, match="is not part of a Redis Cluster"):
        connect(f"redis://{node},{node}", wait_s=1)


def test_a_command_whose_redis_does_not_answer_says_so_in_one_line(tmp_path: Path) -> None:
    env = {"RDV_REDIS_URL": f"redis://127.0.0.1:{_dead_port()}", "RDV_DATA_DIR": str(tmp_path),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "decisions", "--deployment", "d"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("rdv decisions: Redis at redis://")


def test_rdv_decisions_rides_out_an_election(
    redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``rdv decisions`` 0.3 s after a master was killed exited within a second, naming nodes
    that were up (a helper's probe): the cluster client tries a lost node's slots twice within
    a tenth of a second. A command's read now rides out the election, saying so once."""
    from gateway.cli.main import main
    from rendezvous import names
    from rendezvous.decision import DecisionRecord

    redis_cluster.wait_healthy(30.0)
    client = connect(redis_cluster.url, wait_s=5)
    assert isinstance(client, redis.RedisCluster)
    stream = names.decisions_stream("ride-out")
    client.sadd(names.DEPLOYMENTS_SET, "ride-out")
    rec = DecisionRecord(request_id="r-1", deployment="ride-out", ts_ms=1.0, outcome="timeout",
                         chosen_role=None, answered_after_ms=1.0, outputs={}, missing=(),
                         divergences={})  # fmt: skip
    client.xadd(stream, rec.encode())  # type: ignore[arg-type]
    victim = client.get_node_from_key(stream).port
    nodes = ",".join(u.removeprefix("redis://") for u in redis_cluster.urls)
    monkeypatch.setenv("RDV_REDIS_URL", f"redis://{nodes}")
    redis_cluster.kill(victim)
    try:
        started = time.monotonic()
        main(["decisions", "--deployment", "ride-out", "--limit", "0"])
        took = time.monotonic() - started
        out, err = capsys.readouterr()
        assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["r-1"]
        assert err.count("Redis failed for a moment") == 1, err
        assert took > 0.5  # it did wait for the election (about 2-3 s here)
    finally:
        client.close()
        redis_cluster.restart(victim)
        redis_cluster.wait_healthy(30.0)
