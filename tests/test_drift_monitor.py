"""The drift monitor against a real Redis: sketches in, report, history, events and the
post-promotion score reference out; one evaluator per deployment at a time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.dataplane.deployments import DeploymentCache
from gateway.observability import drift_store
from gateway.observability.drift_feed import BIN_SLICE, SKETCH_FIELD, DriftFeed
from gateway.observability.drift_monitor import DriftMonitor
from gateway.observability.drift_sketches import local_model_meta
from gateway.observability.drift_view import drift_view, set_thresholds
from gateway.observability.evaluation_leases import LEASE_RECHECK_S
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, demo_data
from rendezvous import names
from rendezvous.bus.connection import connect_async
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.divergence import Divergence
from rendezvous.drift import Sketch, score_counts
from rendezvous.drift_alerts import Thresholds
from rendezvous.schedule import Schedule

REAL = "breast-cancer:2"


@pytest.fixture
async def client(
    r: redis.Redis, redis_url: str, demo_data_dir: Path
) -> AsyncIterator[aioredis.Redis]:
    DeploymentStore(r).create(demo_deployment(ModelRegistry(demo_data_dir / "models"), Schedule()))
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def cache(client: aioredis.Redis) -> DeploymentCache:
    deployments = DeploymentCache(client)
    await deployments.refresh()
    return deployments


def record(real: list[float], canary: list[float], js: float, disagree: int) -> DecisionRecord:
    """A decision record as the matcher writes it (one row)."""

    def out(version: int, probabilities: list[float]) -> BinOutput:
        label = int(probabilities[1] >= 0.5)
        return BinOutput("breast-cancer", version, 0.1, 0.2, 1.0, [label], [probabilities])

    div = Divergence(rows=1, disagreements=disagree, abs_diff_mean=None, abs_diff_max=None,
                     js_mean=js, js_max=js)  # fmt: skip
    return DecisionRecord(
        request_id="r",
        deployment=DEMO_DEPLOYMENT,
        ts_ms=0.0,
        outcome="real",
        chosen_role="real",
        answered_after_ms=1.0,
        outputs={"real": out(2, real), "canary": out(1, canary)},
        missing=(),
        divergences={"canary": div},
    )


async def feed_traffic(feed: DriftFeed, rows: np.ndarray, scores: np.ndarray) -> None:
    for row, score in zip(rows, scores, strict=True):
        feed.observe_rows(DEMO_DEPLOYMENT, row[None, :])
        feed.observe_decision(record([1 - score, score], [0.5, 0.5], 0.02, 0))
    assert await feed.flush() == 1


async def test_report_history_and_events_follow_the_traffic(
    client: aioredis.Redis, demo_data_dir: Path
) -> None:
    deployments = await cache(client)
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(
        client,
        deployments,
        "gw-1",
        window_requests=200,
        defaults=Thresholds(min_requests=100),
        local_meta=local_model_meta(demo_data_dir / "models"),
    )
    x = demo_data().x_test
    rng = np.random.default_rng(1)

    clock = iter(time.time() * 1000 + 5000 * k for k in range(10))  # an interval apart

    first = await monitor.evaluate(DEMO_DEPLOYMENT, next(clock))
    assert first["current"]["status"] == "insufficient_data" and first["alerts"] == {}

    await feed_traffic(feed, x[rng.integers(0, len(x), 200)], rng.uniform(0.9, 1.0, 200))
    report = await monitor.evaluate(DEMO_DEPLOYMENT, next(clock))
    assert report["current"]["status"] == "ok" and report["current"]["requests"] == 200
    assert report["current"]["score"]["reference_source"] == "training"  # from the files
    assert report["current"]["features"]["max_psi"] < 1.0

    # a strong feature shift raises feature_psi once, then keeps it active without new events
    shifted = x[rng.integers(0, len(x), 200)] * 3.0
    await feed_traffic(feed, shifted, rng.uniform(0.9, 1.0, 200))
    raised = await monitor.evaluate(DEMO_DEPLOYMENT, next(clock))
    assert "feature_psi" in raised["alerts"]
    view = await drift_view(client, DEMO_DEPLOYMENT, monitor.defaults)
    assert view["event_counts"]["feature_psi"] == 1
    [shown] = [a for a in view["alerts"] if a["kind"] == "feature_psi"]
    assert shown["source"] == "monitor"
    assert shown["since_ms"] == pytest.approx(raised["alerts"]["feature_psi"]["since_ms"], abs=1)
    again = await monitor.evaluate(DEMO_DEPLOYMENT, next(clock))
    assert again["alerts"]["feature_psi"]["since_ms"] == raised["alerts"]["feature_psi"]["since_ms"]
    view = await drift_view(client, DEMO_DEPLOYMENT, monitor.defaults)
    assert view["event_counts"]["feature_psi"] == 1

    # raising the threshold above the value clears it at the next evaluation
    value = raised["alerts"]["feature_psi"]["value"]
    await set_thresholds(
        client, DEMO_DEPLOYMENT, {"feature_psi": value * 2}, monitor.defaults, 1000
    )
    cleared = await monitor.evaluate(DEMO_DEPLOYMENT, next(clock))
    assert "feature_psi" not in cleared["alerts"]

    view = await drift_view(client, DEMO_DEPLOYMENT, monitor.defaults)
    assert [e["type"] for e in view["events"] if e["kind"] == "feature_psi"] == [
        "raised",
        "cleared",
    ]
    assert "feature_psi" not in {a["kind"] for a in view["alerts"]}
    assert len(view["history"]) == 5
    assert view["history"][0]["ts_ms"] < view["history"][-1]["ts_ms"]
    assert view["thresholds"]["feature_psi"] == pytest.approx(value * 2)


async def test_an_evaluations_alerts_are_written_before_its_report(
    client: aioredis.Redis, demo_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that sees an evaluation's report sees its alerts too: the report went first,
    and the drift view between the two writes showed a new window beside the last one's
    alerts (a fresh-clone CI run's class-drift test read a shifted window and no alert)."""
    deployments = await cache(client)
    monitor = DriftMonitor(client, deployments, "gw-1", window_requests=200,
                           defaults=Thresholds(min_requests=100),
                           local_meta=local_model_meta(demo_data_dir / "models"))  # fmt: skip
    x = demo_data().x_test
    rng = np.random.default_rng(2)
    report_at_claim: list[float | None] = []
    claim = drift_store.claim

    async def watched(*args: Any, **kwargs: Any) -> Any:
        raw = await client.get(names.drift_report_key(DEMO_DEPLOYMENT))
        report_at_claim.append(json.loads(raw)["evaluated_at_ms"] if raw else None)
        return await claim(*args, **kwargs)

    monkeypatch.setattr(drift_store, "claim", watched)
    await feed_traffic(DriftFeed(client, deployments), x[rng.integers(0, len(x), 200)] * 3.0,
                       rng.uniform(0.9, 1.0, 200))  # fmt: skip
    now = time.time() * 1000
    raised = await monitor.evaluate(DEMO_DEPLOYMENT, now)
    assert "feature_psi" in raised["alerts"]
    assert report_at_claim == [None]  # the claim went first: no report of it yet
    view = await drift_view(client, DEMO_DEPLOYMENT, monitor.defaults)
    assert view["evaluated_at_ms"] == raised["evaluated_at_ms"]
    assert "feature_psi" in {a["kind"] for a in view["alerts"]}


async def test_deployments_of_the_same_features_are_each_read_against_their_own_training(
    client: aioredis.Redis,
) -> None:
    """The feed's and the monitor's references were kept by the spec's version, which names
    the features alone: a second deployment of the demo's features, trained on rows three
    times as large, was binned and judged against the demo's statistics (a helper's probe:
    PSI 0.045 where its own read 18.4, and no alert)."""
    from models.reference import training_spec

    deployments = await cache(client)
    demo = deployments.deployments[DEMO_DEPLOYMENT]
    x = demo_data().x_train
    twin_spec = training_spec(list(demo.feature_spec.names), x * 3.0)
    assert twin_spec.version == demo.feature_spec.version  # the same layout
    deployments.deployments["twin"] = dataclasses.replace(demo, name="twin",
                                                          feature_spec=twin_spec)  # fmt: skip
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(client, deployments, "gw-1")
    for reference_of in (feed._reference, monitor._feature_reference):
        ours, theirs = reference_of(DEMO_DEPLOYMENT), reference_of("twin")
        assert ours is not None and theirs is not None
        assert np.allclose(theirs.cuts, 3.0 * ours.cuts, rtol=1e-6)
        assert reference_of("twin") is theirs  # built once while the spec stands


async def test_an_evaluation_is_no_earlier_than_the_window_it_read(client: aioredis.Redis) -> None:
    """A sketch another gateway closed while this one read (after the evaluation's clock was
    read) counts in the window: the report said it was evaluated before its own window ended,
    and a reader waiting for an evaluation of all it sent waited for ever (a CI run)."""
    deployments = await cache(client)
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(client, deployments, "gw-1", window_requests=50,
                           defaults=Thresholds(min_requests=10))  # fmt: skip
    started_ms = time.time() * 1000
    await asyncio.sleep(0.01)
    x = demo_data().x_test[:50]
    await feed_traffic(feed, x, np.full(len(x), 0.9))  # closed after the clock was read
    report = await monitor.evaluate(DEMO_DEPLOYMENT, started_ms)
    assert report["current"]["to_ms"] > started_ms
    assert report["evaluated_at_ms"] >= report["current"]["to_ms"]


async def test_the_latest_part_of_the_window_clears_an_alert(client: aioredis.Redis) -> None:
    """Once the latest requests are back to normal, an alert clears, though the window still
    holds the shifted ones; a single evaluation of a window that is over its threshold while
    the latest part is not raises nothing."""
    deployments = await cache(client)
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(client, deployments, "gw-1", window_requests=500,
                           defaults=Thresholds(min_requests=100))  # fmt: skip
    assert monitor.clear_requests == 200
    x = demo_data().x_test
    rng = np.random.default_rng(3)
    await feed_traffic(feed, x[rng.integers(0, len(x), 300)] * 3.0, rng.uniform(0.9, 1.0, 300))
    raised = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert "feature_psi" in raised["alerts"]
    await feed_traffic(feed, x[rng.integers(0, len(x), 200)], rng.uniform(0.9, 1.0, 200))
    healed = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert healed["current"]["values"]["feature_psi"] > 1.0  # the window: 300 of 500 shifted
    assert healed["latest"]["values"]["feature_psi"] < 1.0
    assert "feature_psi" not in healed["alerts"]
    again = await monitor.evaluate(DEMO_DEPLOYMENT)  # the window alone does not raise it again
    assert "feature_psi" not in again["alerts"]


async def test_an_alert_of_the_monitor_holds_while_the_deployment_is_idle(
    client: aioredis.Redis,
) -> None:
    """Idle, the monitor evaluates a deployment only every IDLE_INTERVAL_S, so its claim must
    stay fresh that long: another source's claim in between (a gateway's prior detector, a
    log bin, renewing theirs every second) must not clear the monitor's alert, for it to be
    raised again at the next idle evaluation (a clear and a raise sent to the webhooks for
    every pause in the traffic). A monitor that stops evaluating altogether still lets go."""
    from gateway.observability import drift_monitor

    deployments = await cache(client)
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(client, deployments, "gw-1", interval_s=0.5, window_requests=200,
                           defaults=Thresholds(min_requests=100))  # fmt: skip
    x = demo_data().x_test
    rng = np.random.default_rng(5)
    await feed_traffic(feed, x[rng.integers(0, len(x), 200)] * 3.0, rng.uniform(0.9, 1.0, 200))
    t0 = time.time() * 1000
    assert "feature_psi" in (await monitor.evaluate(DEMO_DEPLOYMENT, t0))["alerts"]

    idle_ms = drift_monitor.IDLE_INTERVAL_S * 1000
    for late_ms in (5_000, idle_ms / 2, idle_ms + 2_000):  # before the next idle evaluation
        events = await drift_store.claim(client, DEMO_DEPLOYMENT, "gateway:other", {},
                                         stale_ms=9_000, now_ms=t0 + late_ms)  # fmt: skip
        assert events == [], late_ms
    assert "feature_psi" in {
        a["kind"] for a in (await drift_store.read(client, DEMO_DEPLOYMENT))["alerts"]
    }
    again = await monitor.evaluate(DEMO_DEPLOYMENT, t0 + idle_ms + 2_500)
    assert "feature_psi" in again["alerts"]
    view = await drift_view(client, DEMO_DEPLOYMENT, monitor.defaults)
    assert [e["type"] for e in view["events"] if e["kind"] == "feature_psi"] == ["raised"]

    # no merge at all for several idle intervals (every gateway gone, as when Redis is away):
    # the monitor's claim, fresh when the merges stopped, has its bound anew from the first
    # merge after; with merges running again and no monitor to renew it, it then clears
    resumed = t0 + 4 * idle_ms
    bound = monitor._claim_stale_ms()
    for now_ms in np.arange(resumed, resumed + bound, 4_000):
        events = await drift_store.claim(client, DEMO_DEPLOYMENT, "gateway:other", {},
                                         stale_ms=9_000, now_ms=float(now_ms))  # fmt: skip
        assert events == [], now_ms - resumed
    events = await drift_store.claim(client, DEMO_DEPLOYMENT, "gateway:other", {},
                                     stale_ms=9_000, now_ms=resumed + bound + 1)  # fmt: skip
    assert [(e["type"], e["kind"]) for e in events] == [("cleared", "feature_psi")]


async def test_without_a_training_reference_the_first_window_after_promotion_is_it(
    client: aioredis.Redis, r: redis.Redis
) -> None:
    assert r.hget(names.MODELS_INDEX, REAL) is None  # neither in the index...
    deployments = await cache(client)
    feed = DriftFeed(client, deployments)
    monitor = DriftMonitor(
        client,
        deployments,
        "gw-1",
        window_requests=100,
        defaults=Thresholds(min_requests=50),
        local_meta=lambda n, v: {"name": n},
    )  # ...nor with one
    x = demo_data().x_test
    rng = np.random.default_rng(2)
    await feed_traffic(feed, x[:60], rng.uniform(0.0, 0.5, 60))
    early = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert early["current"]["score"]["reference_source"] is None  # not a full window yet
    assert early["current"]["values"]["score_psi"] is None
    await feed_traffic(feed, x[:60], rng.uniform(0.0, 0.5, 60))
    built = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert built["current"]["score"]["reference_source"] == "promotion"
    stored = json.loads(r.get(names.drift_reference_key(DEMO_DEPLOYMENT)))
    assert stored["model"] == REAL and stored["requests"] == 120
    # later scores move to the other end: score drift against that reference
    await feed_traffic(feed, x[:100], rng.uniform(0.5, 1.0, 100))
    drifted = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert {"score_psi", "score_js"} <= set(drifted["alerts"])
    # the reference is kept, not rebuilt from the drifted traffic
    assert json.loads(r.get(names.drift_reference_key(DEMO_DEPLOYMENT)))["to_ms"] == stored["to_ms"]


def test_model_metadata_is_read_from_local_files_too(demo_data_dir: Path, tmp_path: Path) -> None:
    meta = local_model_meta(demo_data_dir / "models")("breast-cancer", 2)
    assert meta is not None and len(meta["score_reference"]) == 10
    assert local_model_meta(tmp_path)("breast-cancer", 2) is None


async def test_one_evaluator_per_deployment_at_a_time(client: aioredis.Redis) -> None:
    """The lease goes to one process; its answer is kept locally (a holder renews a third of
    the way through the lease, another process asks again after LEASE_RECHECK_S), so a lapsed
    lease is taken over within that."""
    deployments = await cache(client)
    one = DriftMonitor(client, deployments, "gw-1", interval_s=0.2)
    two = DriftMonitor(client, deployments, "gw-2", interval_s=0.2)
    ttl_s = (int(0.2 * 3000) + 1000) / 1000
    t = time.monotonic()
    assert await one.leases.holds(DEMO_DEPLOYMENT, t)
    assert not await two.leases.holds(DEMO_DEPLOYMENT, t)
    await client.delete(names.drift_lock_key(DEMO_DEPLOYMENT))  # the holder died: lease lapses
    assert await one.leases.holds(DEMO_DEPLOYMENT, t + 0.1)  # still its own, as far as it knows
    assert not await two.leases.holds(DEMO_DEPLOYMENT, t + 0.1)  # not asked again yet
    assert await two.leases.holds(DEMO_DEPLOYMENT, t + LEASE_RECHECK_S + 0.01)  # taken over
    assert not await one.leases.holds(DEMO_DEPLOYMENT, t + ttl_s / 3 + 0.01)  # its renewal sees it
    assert await two.leases.holds(DEMO_DEPLOYMENT, t + 30)  # renewed by its holder
    assert await client.pttl(names.drift_lock_key(DEMO_DEPLOYMENT)) > 0.9 * ttl_s * 1000


async def test_leases_of_many_deployments_are_asked_together_and_each_has_one_holder(
    bus_url: str,
) -> None:
    """The leases of every deployment a tick asks about go in one round trip (one script
    each, on whichever node holds each key): each deployment gets exactly one holder, a lease
    held by a process that is not asking stays its own, and a holder's renewal keeps it."""
    client = await connect_async(bus_url)
    deps = [f"lease-{k}" for k in range(6)]
    try:
        for d in deps:
            await client.delete(names.drift_lock_key(d))
        await client.set(names.drift_lock_key(deps[0]), "gw-elsewhere", px=60_000)
        cache = DeploymentCache(client)
        one = DriftMonitor(client, cache, "gw-1", interval_s=5.0)
        two = DriftMonitor(client, cache, "gw-2", interval_s=5.0)
        t = time.monotonic()
        led_one = await one.leases.held(deps[:4], t)
        led_two = await two.leases.held(deps, t)
        assert led_one == deps[1:4]  # deps[0] is held elsewhere
        assert led_two == deps[4:]
        for d in deps[1:]:
            holder = "gw-1" if d in led_one else "gw-2"
            assert await client.get(names.drift_lock_key(d)) == holder.encode()
        assert await client.get(names.drift_lock_key(deps[0])) == b"gw-elsewhere"
        await client.pexpire(names.drift_lock_key(deps[1]), 500)
        assert await one.leases.held(deps[:4], t + 30) == deps[1:4]  # renewed, not lost
        assert await client.pttl(names.drift_lock_key(deps[1])) > 10_000
        assert await two.leases.held(deps, t + 30) == deps[4:]
    finally:
        for d in deps:
            await client.delete(names.drift_lock_key(d))
        await client.aclose()


async def test_a_stopping_holder_hands_its_lease_over_at_once(client: aioredis.Redis) -> None:
    """At shutdown a holder deletes its lease (only its own: one lapsed to another process
    stays), so the next process takes over at its next check, not after three intervals."""
    deployments = await cache(client)
    one = DriftMonitor(client, deployments, "gw-1", interval_s=5.0)
    two = DriftMonitor(client, deployments, "gw-2", interval_s=5.0)
    t = time.monotonic()
    assert await one.leases.holds(DEMO_DEPLOYMENT, t)
    assert not await two.leases.holds(DEMO_DEPLOYMENT, t)
    await one.release()
    assert await client.get(names.drift_lock_key(DEMO_DEPLOYMENT)) is None
    assert await two.leases.holds(DEMO_DEPLOYMENT, t + LEASE_RECHECK_S + 0.01)
    assert not await one.leases.holds(DEMO_DEPLOYMENT, t + 0.1)  # asks Redis again: two holds it
    await one.release()  # holds nothing: two's lease stays
    assert await client.get(names.drift_lock_key(DEMO_DEPLOYMENT)) == b"gw-2"


async def test_an_evaluation_trims_the_sketches_no_window_needs_any_more(
    client: aioredis.Redis, demo_data_dir: Path
) -> None:
    """Sketches older than the window just merged are trimmed (the stream holds about a
    window, not ``drift_sketch_maxlen``), but only once the score reference is settled: a
    real model without one still needs its first full window, from the stream's start."""
    deployments = await cache(client)
    stream = names.drift_sketch_stream(DEMO_DEPLOYMENT)
    x = demo_data().x_test
    rng = np.random.default_rng(4)
    unsettled = DriftMonitor(client, deployments, "gw-1", window_requests=150,
                             defaults=Thresholds(min_requests=50),
                             local_meta=lambda n, v: {"name": n})  # fmt: skip
    feed = DriftFeed(client, deployments)
    await feed_traffic(feed, x[:100], rng.uniform(0.0, 1.0, 100))
    waiting = await unsettled.evaluate(DEMO_DEPLOYMENT)
    assert waiting["current"]["score"]["reference_source"] is None
    assert await client.xlen(stream) == 1  # kept: it starts the reference window

    await client.delete(names.drift_reference_key(DEMO_DEPLOYMENT))
    monitor = DriftMonitor(client, deployments, "gw-1", window_requests=150,
                           defaults=Thresholds(min_requests=50),
                           local_meta=local_model_meta(demo_data_dir / "models"))  # fmt: skip
    for _ in range(5):
        await feed_traffic(feed, x[:100], rng.uniform(0.0, 1.0, 100))
    newest = [entry_id for entry_id, _ in await client.xrevrange(stream, count=2)]
    report = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert report["current"]["requests"] == 200  # two sketches of 100 for a window of 150
    assert report["current"]["score"]["reference_source"] == "training"
    assert [entry_id for entry_id, _ in await client.xrevrange(stream)] == newest
    await feed_traffic(feed, x[:100], rng.uniform(0.0, 1.0, 100))
    again = await monitor.evaluate(DEMO_DEPLOYMENT)
    assert again["current"]["requests"] == 200 and await client.xlen(stream) == 2


async def test_unreadable_sketches_are_skipped(client: aioredis.Redis) -> None:
    deployments = await cache(client)
    await client.xadd(names.drift_sketch_stream(DEMO_DEPLOYMENT), {b"s": b"garbage"})
    monitor = DriftMonitor(client, deployments, "gw-1")
    report = await monitor.evaluate(DEMO_DEPLOYMENT, now_ms=time.time() * 1000)
    assert report["current"]["requests"] == 0


async def test_a_big_flush_bins_every_row_in_slices_and_lets_the_loop_run(
    client: aioredis.Redis, r: redis.Redis
) -> None:
    """Rows of many requests are binned a slice at a time, with the event loop free between
    slices (requests would otherwise wait out the whole binning), and none is lost."""

    feed = DriftFeed(client, await cache(client))
    x = demo_data().x_test.astype(np.float32)
    requests = BIN_SLICE * 2 + 17
    for i in range(requests):
        feed.observe_rows(DEMO_DEPLOYMENT, x[i % len(x)][None, :])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    seen: list[int] = []
    bin_slice = feed._bin

    def counting_bin(deployment: str, chunks: list[np.ndarray]) -> None:
        seen.append(ticks)
        bin_slice(deployment, chunks)

    feed._bin = counting_bin  # type: ignore[method-assign]
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    assert await feed.flush() == 1
    task.cancel()
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2]  # the loop ran between slices
    [(_id, fields)] = r.xrange(names.drift_sketch_stream(DEMO_DEPLOYMENT))
    assert Sketch.from_bytes(fields[SKETCH_FIELD]).feature_rows == requests


async def test_an_idle_deployment_is_evaluated_every_idle_interval_a_busy_one_at_once(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never evaluated: due. Then, with no new sketches, not due at the interval, only once
    IDLE_INTERVAL_S passed; with new requests, due at the interval (or at once past
    evaluate_every); an evaluation too soon after the last point of history is followed by one
    more at the interval, so the history ends on the final state."""
    from gateway.observability import drift_monitor

    deployments = await cache(client)
    monitor = DriftMonitor(
        client, deployments, "gw-1", interval_s=0.1, evaluate_every=50, tick_s=0.01
    )
    assert await monitor._due_deployments() == ([DEMO_DEPLOYMENT],) * 3
    await monitor.evaluate(DEMO_DEPLOYMENT)
    monkeypatch.setattr(drift_monitor, "IDLE_INTERVAL_S", 0.4)
    await asyncio.sleep(0.15)
    assert (await monitor._due_deployments())[2] == []  # the interval passed, nothing came
    await asyncio.sleep(0.3)
    assert (await monitor._due_deployments())[2] == [DEMO_DEPLOYMENT]  # the idle interval
    await monitor.evaluate(DEMO_DEPLOYMENT)
    feed = DriftFeed(client, deployments)
    x = demo_data().x_test
    await feed_traffic(feed, x[:10], np.full(10, 0.9))
    assert (await monitor._due_deployments())[2] == []  # 10 new: wait for the interval
    await asyncio.sleep(0.15)
    assert (await monitor._due_deployments())[2] == [DEMO_DEPLOYMENT]
    await monitor.evaluate(DEMO_DEPLOYMENT)
    await feed_traffic(feed, x[:60], np.full(60, 0.9))
    await asyncio.sleep(0.02)  # a tick: the look before found sketches, so this one looks
    assert (await monitor._due_deployments())[2] == [DEMO_DEPLOYMENT]  # past evaluate_every
    history = names.drift_history_stream(DEMO_DEPLOYMENT)
    points = await client.xlen(history)
    await monitor.evaluate(DEMO_DEPLOYMENT)  # too soon after the last point: none written
    assert await client.xlen(history) == points
    assert (await monitor._due_deployments())[2] == []
    await asyncio.sleep(0.15)  # nothing new, but the final state is not on the chart yet
    assert (await monitor._due_deployments())[2] == [DEMO_DEPLOYMENT]
    await monitor.evaluate(DEMO_DEPLOYMENT)
    assert await client.xlen(history) == points + 1
    await asyncio.sleep(0.15)
    assert (await monitor._due_deployments())[2] == []  # recorded: idle again
    dep = deployments.deployments[DEMO_DEPLOYMENT]  # a rollback with no traffic: at once
    deployments.deployments[DEMO_DEPLOYMENT] = dataclasses.replace(dep, revision=dep.revision + 1)
    assert (await monitor._due_deployments())[2] == [DEMO_DEPLOYMENT]
    assert (await monitor._due_deployments())[2] == []
    deployments.deployments.pop(DEMO_DEPLOYMENT)  # deleted and purged: nothing of it is kept
    assert await monitor._due_deployments() == ([], [], [])
    assert not (monitor._last_eval or monitor._last_seen or monitor._revisions)


async def test_a_quiet_deployment_is_looked_at_after_the_quiet_wait_a_busy_one_every_tick(
    client: aioredis.Redis,
) -> None:
    """A look that found no sketch waits ``quiet_s`` for the next (twenty idle deployments
    read every half second were a third of an idle gateway's CPU); one that found sketches
    looks again at the next tick, so traffic is noticed within the quiet wait and then
    followed tick by tick."""
    deployments = await cache(client)
    monitor = DriftMonitor(client, deployments, "gw-1", tick_s=0.05, quiet_s=0.4)
    led, looked, due = await monitor._due_deployments()
    assert led == looked == due == [DEMO_DEPLOYMENT]  # never looked at, never evaluated
    await monitor.evaluate(DEMO_DEPLOYMENT)
    t0 = time.monotonic()
    await asyncio.sleep(0.06)
    assert (await monitor._due_deployments())[1] == []  # its first look found no sketch
    await feed_traffic(DriftFeed(client, deployments), demo_data().x_test[:5], np.full(5, 0.9))
    await asyncio.sleep(0.06)
    if time.monotonic() - t0 < 0.3:  # a loaded host may have slept through the quiet wait
        assert (await monitor._due_deployments())[1] == []  # not yet: quiet
    await asyncio.sleep(max(0.0, t0 + 0.4 - time.monotonic()))
    assert (await monitor._due_deployments())[1] == [DEMO_DEPLOYMENT]  # the quiet wait
    await asyncio.sleep(0.06)
    assert (await monitor._due_deployments())[1] == [DEMO_DEPLOYMENT]  # sketches: each tick


async def test_many_row_records_have_their_scores_counted_at_the_flush_in_their_own_sketch(
    client: aioredis.Redis,
) -> None:
    """A record's scores wait for the flush, and are counted there into the sketch of the real
    model that gave them: a promotion between two records never mixes their counts."""
    feed = DriftFeed(client, await cache(client))
    rng = np.random.default_rng(5)

    def many(version: int, scores: np.ndarray) -> DecisionRecord:
        one = record([0.5, 0.5], [0.5, 0.5], 0.02, 0)
        proba = [[float(1 - s), float(s)] for s in scores]
        labels = [int(s >= 0.5) for s in scores]
        real = one.outputs["real"]._replace(version=version, labels=labels, probabilities=proba)
        rows = len(scores)
        canary = one.outputs["canary"]._replace(
            labels=[0] * rows, probabilities=[[0.9, 0.1]] * rows
        )
        return dataclasses.replace(one, outputs={"real": real, "canary": canary})

    before, after = rng.uniform(0, 1, (3, 40)), rng.uniform(0, 1, 25)
    for scores in before:
        feed.observe_decision(many(2, scores))
    feed.observe_decision(many(3, after))  # promoted: a new sketch
    assert await feed.flush() == 2
    entries = await client.xrange(names.drift_sketch_stream(DEMO_DEPLOYMENT))
    sketches = {s.real_model: s for s in (Sketch.from_bytes(f[SKETCH_FIELD]) for _, f in entries)}
    assert set(sketches) == {"breast-cancer:2", "breast-cancer:3"}
    old, new = sketches["breast-cancer:2"], sketches["breast-cancer:3"]
    assert (old.requests, old.rows, new.requests, new.rows) == (3, 120, 1, 25)
    assert old.score_real.tolist() == score_counts(before.ravel()).tolist()
    assert new.score_real.tolist() == score_counts(after).tolist()
    assert old.score_canary.tolist() == score_counts(np.full(120, 0.1)).tolist()
    assert await feed.flush() == 0  # nothing kept twice


async def test_sketches_redis_did_not_take_go_out_with_a_later_flush(
    client: aioredis.Redis, tmp_path: Path
) -> None:
    """A flush while Redis restarts fails and keeps its sketch; the next flush, once Redis is
    back, writes it beside the new one: the drift window loses none of those requests."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    own = await connect_async(server.url, timeout_s=1.0)
    try:
        feed = DriftFeed(own, await cache(client))
        x = demo_data().x_test
        server.stop()
        await feed_traffic_unflushed(feed, x[:50])
        with pytest.raises(REDIS_FAILURES):
            await feed.flush()
        server.start()
        await feed_traffic_unflushed(feed, x[50:60])
        assert await feed.flush() == 2  # the one kept, and the new one
        entries = await own.xrange(names.drift_sketch_stream(DEMO_DEPLOYMENT))
        sketches = [Sketch.from_bytes(f[SKETCH_FIELD]) for _, f in entries]
        # written at once (one XADD each, concurrently): in either order
        assert sorted(s.requests for s in sketches) == [10, 50]
        assert await feed.flush() == 0  # nothing is written twice
    finally:
        await own.aclose()
        server.stop()


async def feed_traffic_unflushed(feed: DriftFeed, rows: np.ndarray) -> None:
    for row in rows:
        feed.observe_rows(DEMO_DEPLOYMENT, row[None, :])
        feed.observe_decision(record([0.2, 0.8], [0.5, 0.5], 0.02, 0))
