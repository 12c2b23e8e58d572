"""The prediction prior in a gateway process against a real Redis: a class-prior shift alerted
against real's training scores (a binary and a multiclass model), and the alert handed between
gateway processes (``gateway.observability.prior_handover``): adopted from a process that died,
held by one with no traffic yet, let go by one that judges nothing more."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.drift_online import OnlineDrift
from gateway.observability.drift_sketches import local_model_meta
from gateway.observability.drift_view import drift_view
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.drift_alerts import Thresholds
from rendezvous.drift_prior import positive_share


async def online(aclient: AsyncClient, demo_data_dir: Path, instance: str) -> OnlineDrift:
    deployments = DeploymentCache(aclient)
    await deployments.refresh()
    return OnlineDrift(aclient, deployments, instance,
                       local_meta=local_model_meta(demo_data_dir / "models"))  # fmt: skip


def record(probabilities: list[list[float]]) -> DecisionRecord:
    labels = [int(p[1] >= 0.5) for p in probabilities]
    out = BinOutput("breast-cancer", 2, 0.1, 0.2, 1.0, labels, probabilities)
    return DecisionRecord(request_id="r", deployment=DEMO_DEPLOYMENT, ts_ms=0.0, outcome="real",
                          chosen_role="real", answered_after_ms=1.0, outputs={"real": out},
                          missing=(), divergences={})  # fmt: skip


async def test_a_class_prior_shift_is_alerted_against_real_training_scores(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    det = await online(aclient, demo_data_dir, "gw-1")
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
    [alert] = (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]
    assert alert["kind"] == "prediction_prior" and alert["feature"] is None
    assert "fewer than" in alert["detail"]


async def test_a_multiclass_class_mix_shift_is_alerted_online_naming_the_class(
    aclient: aioredis.Redis,
) -> None:
    """A multiclass real model's prior is judged on its rows' arg max against its class
    reference (before, the prior stayed binary: a class mix that moved waited for the
    monitor's 200-request windows)."""
    meta = {"classes": [0, 1, 2], "class_names": ["setosa", "versicolor", "virginica"],
            "class_reference": [0.25, 0.5, 0.25]}  # fmt: skip
    deployments = DeploymentCache(aclient)
    await deployments.refresh()
    det = OnlineDrift(aclient, deployments, "gw-1",
                      local_meta=lambda name, _v: meta if name == "iris" else None)  # fmt: skip

    def three(klass: int) -> DecisionRecord:
        probabilities = [[0.8 if k == klass else 0.1 for k in range(3)]]
        out = BinOutput("iris", 1, 0.1, 0.2, 1.0, [klass], probabilities)
        return DecisionRecord(request_id="r", deployment=DEMO_DEPLOYMENT, ts_ms=0.0,
                              outcome="real", chosen_role="real", answered_after_ms=1.0,
                              outputs={"real": out}, missing=(), divergences={})  # fmt: skip

    det.observe_decision(three(1))  # the first record looks the reference up
    await asyncio.gather(*det._tasks)
    rng = np.random.default_rng(2)
    for klass in rng.choice(3, 400, p=meta["class_reference"]):
        det.observe_decision(three(int(klass)))
    det.evaluate(DEMO_DEPLOYMENT)
    prior = det._deps[DEMO_DEPLOYMENT].prior
    assert prior is not None and prior.active is None and prior.rows_seen == 400
    for klass in rng.choice(3, 400, p=[0.6, 0.2, 0.2]):  # setosa up, versicolor down
        det.observe_decision(three(int(klass)))
    det.evaluate(DEMO_DEPLOYMENT)
    await asyncio.gather(*det._publishing.values())
    [alert] = (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]
    assert alert["kind"] == "prediction_prior" and "class " in alert["detail"]
    assert alert["detail"].startswith(("real predicts class setosa", "real predicts class versi"))
    summary = det._summary(det._deps[DEMO_DEPLOYMENT])["prior"]  # the claim's, for /drift
    shares = {"setosa": 0.25, "versicolor": 0.5}
    assert summary["class"] in shares and summary["reference"] == shares[summary["class"]]


async def judge_labels(
    det: OnlineDrift, rng: np.random.Generator, rows: int, positive_share: float
) -> list[dict[str, Any]]:
    """``rows`` decisions of real predicting positive at that share, judged and claimed: the
    events the claim decided."""
    for positive in rng.random(rows) < positive_share:
        det.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
    await asyncio.gather(*det._tasks)  # the reference looked up
    det.evaluate(DEMO_DEPLOYMENT)
    return await det.publish(DEMO_DEPLOYMENT)


async def raised_by_a_process_that_dies(
    aclient: aioredis.Redis, demo_data_dir: Path, rng: np.random.Generator, stale_s: float
) -> tuple[DeploymentCache, Callable[..., Any], float]:
    """The prior alert raised by a gateway process ``gw-dead`` that then renews nothing: the
    deployments, the models' metadata and the demo's positive share, for the live ones."""
    meta = ModelRegistry(demo_data_dir / "models").meta("breast-cancer", 2)
    share = positive_share(meta.score_reference)
    assert share is not None
    deployments = DeploymentCache(aclient)
    await deployments.refresh()
    meta_of = local_model_meta(demo_data_dir / "models")
    dead = OnlineDrift(aclient, deployments, "gw-dead", stale_s=stale_s, local_meta=meta_of)
    await judge_labels(dead, rng, 1, share)
    raised = await judge_labels(dead, rng, 300, 0.15)
    assert [(e["type"], e["id"]) for e in raised] == [("raised", "prediction_prior")]
    return deployments, meta_of, share


async def died_holding_the_prior(
    aclient: aioredis.Redis, demo_data_dir: Path, rng: np.random.Generator
) -> tuple[OnlineDrift, float]:
    """A live gateway process that took over the prior alert of one that died (its claim no
    longer renewed, then stale), and the demo's positive share."""
    deployments, meta_of, share = await raised_by_a_process_that_dies(
        aclient, demo_data_dir, rng, 1.0
    )
    live = OnlineDrift(aclient, deployments, "gw-live", orphan_after_s=0.2, local_meta=meta_of)
    await judge_labels(live, rng, 1, share)
    await asyncio.sleep(0.3)  # the dead one renews nothing
    assert await judge_labels(live, rng, 1, share) == []  # adopted
    await asyncio.sleep(0.8)  # its claim is stale now: dropped, the alert stays up
    assert await judge_labels(live, rng, 1, share) == []
    [alert] = (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]
    assert alert["id"] == "prediction_prior" and alert["source"] == "gateway:gw-live"
    claims = await aclient.hkeys(names.drift_claims_key(DEMO_DEPLOYMENT))
    assert [c for c in claims if not c.startswith(b"#")] == [b"gateway:gw-live"]
    return live, share


async def test_a_gateway_process_takes_over_the_prior_alert_of_one_that_died(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    """A gateway process's source name is new at each start, so the prior alert of a process
    that died cleared once its claim went stale, with the feed still broken (found by hand).
    A live process judging the same model adopts a claim no longer renewed, and its detector
    takes the alert as its own: it clears on this process's evidence that the feed is healthy,
    in a few hundred rows (held for a fixed 1,600 rows, a fixed feed kept it about 3,200
    requests with two processes: a session's note)."""
    rng = np.random.default_rng(5)
    live, share = await died_holding_the_prior(aclient, demo_data_dir, rng)
    judged, cleared = 0, []
    while not cleared and judged < live.hold_rows:
        cleared = await judge_labels(live, rng, 20, share)
        judged += 20
    assert [(e["type"], e["id"]) for e in cleared] == [("cleared", "prediction_prior")]
    assert judged <= 600, judged  # its own evidence, well before a fixed hold
    assert (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"] == []
    # with this process's own figure, near the reference: the dead one's, from its raise,
    # read as if the feed were still shifted (a helper's live check)
    assert abs(cleared[0]["value"] - share) < 0.1, cleared[0]


async def test_a_taken_over_prior_alert_stands_while_the_feed_is_still_broken(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    rng = np.random.default_rng(7)
    live, _share = await died_holding_the_prior(aclient, demo_data_dir, rng)
    for _ in range(10):  # twice a fixed hold's rows: no "resolved", no second "firing"
        assert await judge_labels(live, rng, live.hold_rows // 5, 0.15) == []
    [alert] = (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]
    assert alert["id"] == "prediction_prior" and alert["source"] == "gateway:gw-live"


async def test_a_gateway_process_with_no_traffic_yet_holds_the_prior_alert_of_one_that_died(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    """After a restart with no traffic for 10 s, no live process had judged a decision, so
    none adopted the dead process's prior alert: it cleared (a "resolved" with the feed still
    broken) and was raised again at the first traffic (a helper's probe). A process now reads
    the claims of the deployments it has seen nothing of, and adopts."""
    meta = ModelRegistry(demo_data_dir / "models").meta("breast-cancer", 2)
    share = positive_share(meta.score_reference)
    assert share is not None
    rng = np.random.default_rng(6)
    deployments = DeploymentCache(aclient)
    await deployments.refresh()
    meta_of = local_model_meta(demo_data_dir / "models")
    dead = OnlineDrift(aclient, deployments, "gw-dead", stale_s=1.0, local_meta=meta_of)
    for rows, positive_share_ in ((1, share), (300, 0.15)):
        for positive in rng.random(rows) < positive_share_:
            dead.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
        await asyncio.gather(*dead._tasks)
        dead.evaluate(DEMO_DEPLOYMENT)
        await dead.publish(DEMO_DEPLOYMENT)
    assert [a["id"] for a in (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]] == [
        "prediction_prior"]  # fmt: skip
    idle = OnlineDrift(aclient, deployments, "gw-new", orphan_after_s=0.2, local_meta=meta_of)
    await asyncio.sleep(0.3)  # the dead one renews nothing
    await idle.adopt_unseen()  # not one decision seen here
    await asyncio.gather(*idle._tasks)
    await asyncio.sleep(0.8)  # the dead claim is stale now
    assert await idle.publish(DEMO_DEPLOYMENT) == []  # no "cleared": held here
    [alert] = (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"]
    assert alert["id"] == "prediction_prior" and alert["source"] == "gateway:gw-new"
    # Held by a process that sees no traffic, it was held for good: a live process judging
    # healthy rows (as many as a hold lasts) lets it go.
    live = OnlineDrift(aclient, deployments, "gw-live", local_meta=meta_of)
    for rows in (1, live.hold_rows):
        for positive in rng.random(rows) < share:
            live.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
        await asyncio.gather(*live._tasks)
        live.evaluate(DEMO_DEPLOYMENT)
        await live.publish(DEMO_DEPLOYMENT)
    cleared = await idle.publish(DEMO_DEPLOYMENT)
    assert [(e["type"], e["id"]) for e in cleared] == [("cleared", "prediction_prior")]
    assert (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"] == []


async def test_a_prior_alert_of_a_process_that_judges_nothing_more_goes_when_others_judge_well(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    """A process whose connections went elsewhere after it raised the prior alert held it for
    good: its detector was never fed again (20,049 healthy rows judged by the other process;
    a helper's probe). While it judges rows itself, they decide."""
    meta = ModelRegistry(demo_data_dir / "models").meta("breast-cancer", 2)
    share = positive_share(meta.score_reference)
    assert share is not None
    rng = np.random.default_rng(8)

    broke = await online(aclient, demo_data_dir, "gw-broke")
    well = await online(aclient, demo_data_dir, "gw-well")
    await judge_labels(broke, rng, 1, share)
    assert [e["type"] for e in await judge_labels(broke, rng, 300, 0.15)] == ["raised"]
    assert await broke.publish(DEMO_DEPLOYMENT) == []  # marked with no other process yet
    await judge_labels(well, rng, 1, share)  # which counts from its first claim seen
    for _ in range(3):  # it still judges rows, broken ones: they hold its alert
        await judge_labels(well, rng, well.hold_rows // 2, share)
        assert await judge_labels(broke, rng, 20, 0.15) == []
    # From its last judged row on, the other process judges healthy ones, one short...
    assert await judge_labels(well, rng, well.hold_rows - 1, share) == []
    assert await broke.publish(DEMO_DEPLOYMENT) == []
    await judge_labels(well, rng, 1, share)  # ...then as many as a hold lasts
    cleared = await broke.publish(DEMO_DEPLOYMENT)
    assert [(e["type"], e["id"]) for e in cleared] == [("cleared", "prediction_prior")]
    assert cleared[0].get("value") is None  # not the stale broken share it judged last
    assert (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"] == []
    # raised afresh on broken rows of its own
    assert await judge_labels(broke, rng, 300, 0.15) != []
    # a process that first claims after the marks were taken counts from its first claim seen
    late = await online(aclient, demo_data_dir, "gw-late")
    await judge_labels(late, rng, 1, share)
    await judge_labels(late, rng, late.hold_rows, share)
    assert await broke.publish(DEMO_DEPLOYMENT) == []  # counted from here
    await judge_labels(late, rng, late.hold_rows, share)
    cleared = await broke.publish(DEMO_DEPLOYMENT)
    assert [(e["type"], e["id"]) for e in cleared] == [("cleared", "prediction_prior")]


async def test_a_taken_over_prior_alert_clears_on_evidence_while_the_dead_claim_is_fresh(
    aclient: aioredis.Redis, demo_data_dir: Path
) -> None:
    """The feed fixed right after a gateway process died holding the prior alert: the process
    that took it over cleared it on its own evidence, but the dead claim still held it until
    it went stale (10 s), and was adopted again each time, so the alert stood 1,050 to 1,420
    requests at 100/s instead of about 150 (a helper's live check). Once the detector clears
    what it took over, the dead claim is dropped."""
    rng = np.random.default_rng(11)
    deployments, meta_of, share = await raised_by_a_process_that_dies(
        aclient, demo_data_dir, rng, 5.0
    )
    live = OnlineDrift(aclient, deployments, "gw-live", orphan_after_s=0.2, local_meta=meta_of)
    await judge_labels(live, rng, 1, share)
    await asyncio.sleep(0.3)  # the dead one renews nothing: adoptable, not stale
    assert await judge_labels(live, rng, 1, share) == []  # adopted
    judged, cleared = 0, []
    while not cleared and judged < 600:
        cleared = await judge_labels(live, rng, 20, share)
        judged += 20
    assert [(e["type"], e["id"]) for e in cleared] == [("cleared", "prediction_prior")], judged
    assert (await drift_store.read(aclient, DEMO_DEPLOYMENT))["alerts"] == []
    assert abs(cleared[0]["value"] - share) < 0.1, cleared[0]
    for _ in range(3):  # not raised again from the dead claim
        assert await judge_labels(live, rng, 20, share) == []


async def test_an_adopted_alert_another_process_judged_over_is_not_adopted_again_and_again(
    aclient: aioredis.Redis, demo_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted process adopted the dead claim's prior alert and let it go in the same
    claim's loop (the other live process had judged 1,600 rows without it), then adopted it
    again: one claim's loop spun, 137 and 198 times in half a second, two log lines each, until
    the other process adopted it too (a helper's live check)."""
    rng = np.random.default_rng(12)
    deployments, meta_of, share = await raised_by_a_process_that_dies(
        aclient, demo_data_dir, rng, 5.0
    )
    well = OnlineDrift(aclient, deployments, "gw-well", local_meta=meta_of)
    await judge_labels(well, rng, 1, share)
    await judge_labels(well, rng, well.hold_rows, share)
    new = OnlineDrift(aclient, deployments, "gw-new", orphan_after_s=0.2, local_meta=meta_of)
    for positive in rng.random(1) < share:
        new.observe_decision(record([[0.0, 1.0] if positive else [1.0, 0.0]]))
    await asyncio.gather(*new._tasks)
    await asyncio.sleep(0.3)  # the dead one renews nothing
    await well.publish(DEMO_DEPLOYMENT)  # alive, without the alert
    with caplog.at_level(logging.INFO, logger="gateway.observability.prior_handover"):
        await new.publish(DEMO_DEPLOYMENT)
    said = [r.getMessage() for r in caplog.records]
    assert sum("letting go" in m for m in said) == 1, len(said)  # let go for the other, once
    assert sum("holding prediction_prior" in m for m in said) == 1
    assert new._deps[DEMO_DEPLOYMENT].held == {}


async def test_the_view_shows_a_gateway_away_once_its_claim_is_adoptable(
    aclient: aioredis.Redis,
) -> None:
    """A gateway renews its claim every second and another adopts it past 3 s, but the view
    called a source away past 10 s, the stale bound of a gateway's claim: a dead gateway was
    never shown away while its claim held the alert (a helper's live check)."""
    t = time.time() * 1000
    alert = {"prediction_prior": {"kind": "prediction_prior", "value": 0.1}}
    for source in ("gateway:gw-dead", "logbin:lb-quiet"):
        await drift_store.claim(aclient, DEMO_DEPLOYMENT, source, alert, stale_ms=10_000, now_ms=t)
    view = await drift_view(aclient, DEMO_DEPLOYMENT, Thresholds(), now_ms=t + 4_000)
    online = view["online"]
    assert online["gateway:gw-dead"]["away"] is True, online
    assert online["logbin:lb-quiet"]["away"] is False, online  # renews every 3.3 s at least
