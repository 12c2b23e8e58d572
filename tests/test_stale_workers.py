"""A worker that cannot load a promoted version serves the old one: the admin view and
``/metrics`` say which (the real app, a real Redis, real workers and ONNX models)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import AUTH, TOKEN, AppClient, copy_demo_models, upload_body

from gateway.settings import Settings
from gateway.transport.app import create_app
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import ModelRef
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL
from models.worker import ModelWorker
from models.worker_versions import stale_workers
from processes import flush, wait_until
from rendezvous import names
from rendezvous.bus.connection import connect
from rendezvous.schedule import Schedule

DEP = f"/admin/deployments/{DEMO_DEPLOYMENT}"

pytestmark = pytest.mark.integration


def test_only_live_workers_of_a_named_role_with_counters_are_judged() -> None:
    roles = {"real": ModelRef("m", 3), "canary": ModelRef("m", 2)}
    stats = {
        "real|a": {"model": "m", "version": 2},  # the old real: stale
        "real|b": {"model": "m", "version": 3},
        "canary|c": {"model": "m", "version": 2},
        "canary|d": {"model": None, "version": None},  # loaded nothing: stale
        "ch|e": {"model": "m", "version": 1},  # a role the deployment no longer has
        "real|dead": {"model": "m", "version": 1},  # not live
    }
    live = ["real|a", "real|b", "canary|c", "canary|d", "ch|e", "real|new"]  # new: no counters
    assert stale_workers(roles, live, stats) == {
        "real": [{"worker": "a", "serves": "m:2"}],
        "canary": [{"worker": "d", "serves": None}],
    }


@pytest.fixture
def system(bus_url: str, demo_data_dir: Path, tmp_path: Path) -> Iterator[tuple[AppClient, Path]]:
    """The gateway's data folder, and a worker host's own copy of the models (not shared); on
    a single Redis and on the cluster (where the admin view's reads were a 500 at first)."""
    data = copy_demo_models(demo_data_dir, tmp_path / "gateway")
    own = copy_demo_models(demo_data_dir, tmp_path / "worker") / "models"
    r = connect(bus_url)
    flush(r)
    DeploymentStore(r).create(demo_deployment(ModelRegistry(data / "models"), Schedule()))
    client = AppClient(create_app(Settings(redis_url=bus_url, data_dir=data, admin_token=TOKEN)))
    yield client, own
    client.close()
    r.close()


def _stale_gauge(client: AppClient) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rdv_stale_workers{") and f'deployment="{DEMO_DEPLOYMENT}"' in line:
            role = line.split('role="', 1)[1].split('"', 1)[0]
            out[role] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_worker_that_cannot_load_the_promoted_version_is_named_until_it_does(
    bus_url: str, system: tuple[AppClient, Path]
) -> None:
    """Found by a helper's probe: a worker host whose models folder lacked a promoted version
    went on answering as real with the old one, while ``/readyz`` counted it live and its error
    counter stayed 0; only its log said so."""
    client, own = system
    workers = [
        ModelWorker(connect(bus_url), ModelRegistry(own), deployment=DEMO_DEPLOYMENT,
                    role=role, consumer=f"{role}-w", block_ms=100, heartbeat_s=0.2)
        for role in (names.REAL, names.CANARY)
    ]  # fmt: skip
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:

        def shown() -> dict[str, object]:
            return dict(client.get(DEP, headers=AUTH).json())

        wait_until(lambda: shown()["live_workers"] == {"real": 1, "canary": 1}, 15, "workers")
        wait_until(lambda: _stale_gauge(client) == {"real": 0, "canary": 0}, 10, "none stale")
        assert shown()["stale_workers"] == {}

        resp = client.post("/admin/models", json=upload_body("weak"), headers=AUTH)
        assert resp.status_code == 201, resp.text
        version = int(resp.json()["version"])
        promote = client.post(f"{DEP}/promote", json={"version": version}, headers=AUTH)
        assert promote.status_code == 200, promote.text
        # The canary (the old real) loads; the real cannot find the new version in its folder.
        wait_until(lambda: workers[0].load_failures >= 1, 15, "the real worker's failed load")
        wait_until(lambda: _stale_gauge(client) == {"real": 1, "canary": 0}, 10, "real stale")
        stale = shown()["stale_workers"]
        assert stale == {"real": [{"worker": "real-w", "serves": f"{DEMO_MODEL}:2"}]}, stale

        # The version reaches the worker's folder: its next try loads it, and nothing is stale.
        gateway_models = Path(client.app.state.settings.data_dir) / "models"
        shutil.copytree(gateway_models / DEMO_MODEL / str(version), own / DEMO_MODEL / str(version))
        wait_until(lambda: _stale_gauge(client) == {"real": 0, "canary": 0}, 15, "loaded")
        assert shown()["stale_workers"] == {}
    finally:
        stop.set()
        for t in threads:
            t.join(10)
