"""Shared fixtures: one real redis-server (and, for the tests that ask, one real Redis Cluster)
for the session, a flushed client per test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.bus.server import EmbeddedRedis

REAL_SERVERS = {
    "redis_server", "redis_cluster", "bus_url",
    # of a module of their own, or asked for by name (``getfixturevalue``), which the fixture
    # closure does not show: ``-m pure`` ran them (a walkthrough's 159 s)
    "bus", "outage_redis", "paused_redis", "tls_redis", "tls_cluster", "server",
}  # fmt: skip
"""Fixtures (and parameters) that start a real server or ask for one: a test that uses one (or
is marked ``integration``) is an integration test, every other one is ``pure`` (no server, no
process: seconds in all)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & REAL_SERVERS or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.pure)


@pytest.fixture(autouse=True)
def no_app_left_serving() -> Iterator[None]:
    """An in-process app a test leaves serving keeps reading Redis after the test (a stopped
    one, warning as it retries) and fails later tests far from the cause: fail this one."""
    yield
    left = [
        client
        for name in ("admin_support", "tests.admin_support")  # however a test imported it
        if (support := sys.modules.get(name)) is not None
        for client in support.AppClient.serving
    ]
    for client in left:
        client.close()
    assert not left, f"{len(left)} in-process app(s) left serving: close their AppClient"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client on a flushed database."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster (3 masters, 1 replica each) for the session, started on first use
    (about 2 s)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def rc(redis_cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    """A cluster client on a whole cluster (a failover test before may have left it healing),
    every master flushed."""
    redis_cluster.wait_healthy(30.0)
    client = redis.RedisCluster.from_url(redis_cluster.url)
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture(scope="session", params=["single", "cluster"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """The URL of a single Redis, then of the cluster: a test that takes it runs on both (the
    cluster healed first, if a failover test left it healing)."""
    if request.param == "single":
        return str(request.getfixturevalue("redis_url"))
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    cluster.wait_healthy(30.0)
    return cluster.url


@pytest.fixture
def skip_on_cluster(bus_url: str, redis_url: str) -> None:
    """For a test whose subject is the same on either bus, run on the single node only (the
    suite's time); its module's cluster parameter still runs the rest."""
    if bus_url != redis_url:
        pytest.skip("the same on a cluster; run on the single node only")


@pytest.fixture
async def aclient(
    r: redis.Redis, redis_url: str, demo_data_dir: Path
) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client on the session's Redis (flushed) holding the demo deployment."""
    from models.demo import demo_deployment
    from models.deployment_store import DeploymentStore
    from models.registry import ModelRegistry
    from rendezvous.schedule import Schedule

    DeploymentStore(r).create(demo_deployment(ModelRegistry(demo_data_dir / "models"), Schedule()))
    c = redis.asyncio.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the demo models trained once for the whole session."""
    from models.registry import ModelRegistry
    from models.train import train_demo

    root = tmp_path_factory.mktemp("demo-data")
    train_demo(ModelRegistry(root / "models"))
    return root


@pytest.fixture
def demo_registry(demo_data_dir: Path):  # type: ignore[no-untyped-def]
    from models.registry import ModelRegistry

    return ModelRegistry(demo_data_dir / "models")
