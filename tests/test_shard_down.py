"""A shard lost for good (no replica): every route answers at once, not after redis-py's
retries, and everything serves again once the shard is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.train import DEMO_DEPLOYMENT
from processes import PREDICT, bodies, launch_system, report, wait_until
from rendezvous import names
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration

SCHEDULE = Schedule(real_deadline_ms=50, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)
TOKEN = "shard-down-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
QUICK_S = 1.0
"""Longest a route may take to answer with the shard down (redis-py's own retries took 2-5 s
for jobs, labels, admin, readiness and scrapes; predict, on its own router, 0.25 s)."""


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three masters of its own, no replica: a master lost stays lost."""
    with LocalCluster(tmp_path_factory.mktemp("no-replica"), replicas_per_master=0) as nodes:
        yield nodes


def test_every_route_answers_at_once_with_a_shard_down_and_serves_when_it_is_back(
    cluster: LocalCluster, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    d = DEMO_DEPLOYMENT
    with launch_system(cluster.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_ADMIN_TOKEN=TOKEN) as system:  # fmt: skip
        system.start_worker("real")
        system.start_worker("canary")
        body = bodies(1)[0]
        wait_until(lambda: system.predict(body).status_code == 200, 20, "served")
        http = system.http
        calls: dict[str, Callable[[], httpx.Response]] = {
            "predict": lambda: http.post(PREDICT, json=body),
            "job": lambda: http.post(f"/v1/deployments/{d}/jobs", json=body),
            "feedback": lambda: http.post(f"/v1/deployments/{d}/feedback",
                                          json={"request_id": "r-1", "label": 1}),
            "model ready": lambda: http.get(f"/v2/models/{d}/ready"),
            "readyz": lambda: http.get("/readyz"),
            "admin list": lambda: http.get("/admin/deployments", headers=ADMIN),
            "admin get": lambda: http.get(f"/admin/deployments/{d}", headers=ADMIN),
            "admin patch": lambda: http.patch(f"/admin/deployments/{d}/schedule",
                                              json={"timeout_ms": 1500}, headers=ADMIN),
        }  # fmt: skip
        seeds = redis.RedisCluster.from_url(cluster.url)
        victim = int(seeds.get_node_from_key(names.input_stream(d)).port)
        seeds.close()
        cluster.kill(victim)
        seen: dict[str, tuple[int, float]] = {}
        for phase, after_s in (("just lost", 0.3), ("cluster down", 2.5)):
            time.sleep(after_s)  # the second: past cluster-node-timeout (1 s), state fail
            for name, call in calls.items():
                t = time.monotonic()
                resp = call()
                took = time.monotonic() - t
                seen[f"{phase}: {name}"] = (resp.status_code, round(took, 3))
                assert resp.status_code == 503 and resp.headers.get("retry-after"), (
                    phase, name, resp.status_code, resp.text[:300])  # fmt: skip
                assert took < QUICK_S, (phase, name, took)
            scrape = http.get("/metrics")
            assert scrape.status_code == 200 and "rdv_requests_total" in scrape.text
        report("a shard lost, no replica: (status, seconds) by route", seen)
        cluster.restart(victim)
        cluster.wait_healthy(30.0)
        wait_until(lambda: system.predict(body).status_code == 200, 20, "served again")
        assert calls["job"]().status_code == 202
        assert calls["admin get"]().status_code == 200
        assert calls["model ready"]().status_code == 200
