"""The online detectors in a gateway process, against a real Redis: rows in, alerts out in the
shared list (``drift_store``) with their events, counts and webhooks; several sources merged
into one list, a source that goes silent dropped."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.drift_monitor import drift_view, local_model_meta
from gateway.observability.drift_online import OnlineDrift, positive_share
from models.deployment_store import DeploymentStore, demo_deployment
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, demo_data
from rendezvous import names
from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.drift_alerts import Thresholds
from rendezvous.schedule import Schedule


@pytest.fixture
async def client(
    r: redis.Redis, redis_url: str, demo_data_dir: Path
) -> AsyncIterator[aioredis.Redis]:
    DeploymentStore(r).create(demo_deployment(ModelRegistry(demo_data_dir / "models"), Schedule()))
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


class Hooks:
    """Stands in for AlertWebhooks: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def notify(self, deployment: str, events: list[dict[str, Any]], active: Any) -> None:
        self.sent += events


async def online(client: aioredis.Redis, demo_data_dir: Path, instance: str) -> OnlineDrift:
    deployments = DeploymentCache(client)
    await deployments.refresh()
    return OnlineDrift(client, deployments, instance, webhooks=Hooks(),  # type: ignore[arg-type]
                       local_meta=local_model_meta(demo_data_dir / "models"))  # fmt: skip


async def serve(det: OnlineDrift, rows: np.ndarray) -> None:
    """Rows one request at a time, as the gateway hands them over, with the loop running."""
    for row in rows:
        det.observe_rows(DEMO_DEPLOYMENT, row[None, :].astype(np.float32))
        await asyncio.sleep(0)
    det.evaluate(DEMO_DEPLOYMENT)
    await asyncio.gather(*det._publishing.values())


async def test_a_unit_change_is_alerted_named_and_cleared(
    client: aioredis.Redis, demo_data_dir: Path
) -> None:
    det = await online(client, demo_data_dir, "gw-1")
    det.min_interval_s = 0.0
    x = demo_data().x_test
    rng = np.random.default_rng(0)
    await serve(det, x[rng.integers(0, len(x), 400)])
    assert (await drift_store.read(client, DEMO_DEPLOYMENT))["alerts"] == []

    broken = x[rng.integers(0, len(x), 60)].copy()
    broken[:, 0] *= 10  # mean radius in other units
    await serve(det, broken)
    view = await drift_view(client, DEMO_DEPLOYMENT, Thresholds())
    kinds = {(a["kind"], a["feature"]) for a in view["alerts"]}
    assert ("feature_range", "mean radius") in kinds, view["alerts"]
    [alert] = [a for a in view["alerts"] if a["kind"] == "feature_range"]
    assert re.search(r"about \d+(\.\d)? times larger", alert["detail"]), alert["detail"]
    assert alert["source"] == "gateway:gw-1"
    assert alert["id"] == "feature_range/mean radius"
    assert view["event_counts"]["feature_range"] == 1
    assert 400 < view["online"]["gw-1"]["rows"] <= 460  # as of its latest claim
    raised = [e for e in view["events"] if e["type"] == "raised"]
    assert raised and raised[0]["feature"] == "mean radius"
    hooks = det.webhooks.sent  # type: ignore[union-attr]
    assert ("raised", "feature_range") in {(e["type"], e["kind"]) for e in hooks}

    await serve(det, x[rng.integers(0, len(x), 300)])
    view = await drift_view(client, DEMO_DEPLOYMENT, Thresholds())
    assert view["alerts"] == []
    cleared = [e for e in view["events"] if e["type"] == "cleared"]
    assert {e["kind"] for e in cleared} >= {"feature_range"}
    assert all(e["since_ms"] <= e["ts_ms"] for e in cleared)
    assert ("cleared", "feature_range") in {(e["type"], e["kind"]) for e in hooks}


def record(probabilities: list[list[float]]) -> DecisionRecord:
    labels = [int(p[1] >= 0.5) for p in probabilities]
    out = BinOutput("breast-cancer", 2, 0.1, 0.2, 1.0, labels, probabilities)
    return DecisionRecord(request_id="r", deployment=DEMO_DEPLOYMENT, ts_ms=0.0, outcome="real",
                          chosen_role="real", answered_after_ms=1.0, outputs={"real": out},
                          missing=(), divergences={})  # fmt: skip


async def test_a_class_prior_shift_is_alerted_against_real_training_scores(
    client: aioredis.Redis, demo_data_dir: Path
) -> None:
    det = await online(client, demo_data_dir, "gw-1")
    det.observe_decision(record([[0.1, 0.9]]))  # the first record looks the reference up
    await asyncio.gather(*det._tasks)
    meta = ModelRegistry(demo_data_dir / "models").meta("breast-cancer", 2)
    share = positive_share(meta.score_reference)
    assert share is not None and 0.55 < share < 0.7
    rng = np.random.default_rng(1)
    for positive in rng.random(300) < share:
        det.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
    det.evaluate(DEMO_DEPLOYMENT)
    assert det._deps[DEMO_DEPLOYMENT].prior is not None
    assert det._deps[DEMO_DEPLOYMENT].prior.active is None
    for positive in rng.random(300) < 0.15:  # mostly malignant now
        det.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
    det.evaluate(DEMO_DEPLOYMENT)
    await asyncio.gather(*det._publishing.values())
    [alert] = (await drift_store.read(client, DEMO_DEPLOYMENT))["alerts"]
    assert alert["kind"] == "prediction_prior" and alert["feature"] is None
    assert "fewer than" in alert["detail"]


async def test_sources_merge_into_one_list(client: aioredis.Redis) -> None:
    one = {"feature_range/x": {"kind": "feature_range", "feature": "x", "value": 0.9}}
    t = 1_000_000.0
    events = await drift_store.claim(client, DEMO_DEPLOYMENT, "a", one, stale_ms=5000, now_ms=t)
    assert [(e["type"], e["id"]) for e in events] == [("raised", "feature_range/x")]
    # the other source holds it too: no second raise
    assert (
        await drift_store.claim(client, DEMO_DEPLOYMENT, "b", one, stale_ms=5000, now_ms=t + 1)
        == []
    )
    # one lets go: still held by the other
    assert (
        await drift_store.claim(client, DEMO_DEPLOYMENT, "a", {}, stale_ms=5000, now_ms=t + 2) == []
    )
    got = await drift_store.read(client, DEMO_DEPLOYMENT)
    assert [a["id"] for a in got["alerts"]] == ["feature_range/x"]
    assert got["alerts"][0]["since_ms"] == t and got["event_counts"] == {"feature_range": 1}
    # the other goes silent: once its claim is stale, any source's call clears the alert
    events = await drift_store.claim(client, DEMO_DEPLOYMENT, "a", {}, stale_ms=5000,
                                     figures={"feature_range/x": {"value": 0.01}},
                                     now_ms=t + 6000)  # fmt: skip
    assert [(e["type"], e["id"], e["value"]) for e in events] == [
        ("cleared", "feature_range/x", 0.01)
    ]
    r = await client.hkeys(names.drift_claims_key(DEMO_DEPLOYMENT))
    assert r == [b"a"]
    raw = await client.xrange(names.drift_events_stream(DEMO_DEPLOYMENT))
    assert len(raw) == 2
    # a sweep (no claim of its own) drops stale claims too
    assert (
        await drift_store.claim(client, DEMO_DEPLOYMENT, "c", None, stale_ms=0, now_ms=t + 20_000)
        == []
    )
    assert await client.hkeys(names.drift_claims_key(DEMO_DEPLOYMENT)) == []
