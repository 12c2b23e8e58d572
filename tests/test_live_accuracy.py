"""Live accuracy across gateway processes (real Redis): one process a deployment evaluates it,
whichever process took the labels. Every process used to recompute each deployment it took a
label for, each reading twice the window (10-23 ms of Redis a time, twice a second a process
under a steady label feed)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from gateway.observability import evaluation_leases
from gateway.observability.live_accuracy import LiveAccuracy
from models.demo import demo_deployment
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.bus.connection import connect_async
from rendezvous.outcomes import BinAnswer, Label, Outcome
from rendezvous.schedule import Schedule


def _label(r: redis.Redis, i: int, y: int) -> None:
    """A labelled request as the feedback call stores it: real says 1, the canary 0."""
    answers = {
        "real": BinAnswer("breast-cancer", 2, [1], [[0.2, 0.8]]),
        "canary": BinAnswer("breast-cancer", 1, [0], [[0.7, 0.3]]),
    }
    outcome = Outcome(1_000 + i, "real", answers)
    label = Label((y,), None, 1.0, 5)
    r.xadd(names.labelled_stream(DEMO_DEPLOYMENT),
           {"r": f"r{i}", "y": label.encode(), "o": outcome.encode()})  # fmt: skip


def _labelled(r: redis.Redis) -> Any:
    report = json.loads(r.get(names.accuracy_key(DEMO_DEPLOYMENT)) or "null")
    real = [m for m in report["models"] if m["role"] == "real"]
    return real[0]["labelled"] + real[0]["judged"]


async def test_one_process_evaluates_a_deployment_whoever_took_its_labels(
    r: redis.Redis, redis_url: str, demo_registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluation_leases, "LEASE_RECHECK_S", 0.0)  # a takeover at the next tick
    cache: Any = SimpleNamespace(
        deployments={DEMO_DEPLOYMENT: demo_deployment(demo_registry, Schedule())}
    )

    async def classes(_name: str, _version: int) -> list[int]:
        return [0, 1]

    client = await connect_async(redis_url)
    # Every tick looks (the quiet spell's longer wait has a test of its own).
    one = LiveAccuracy(client, cache, "gw-1", window=100, classes_of=classes, tick_s=0, quiet_s=0)
    two = LiveAccuracy(client, cache, "gw-2", window=100, classes_of=classes, tick_s=0, quiet_s=0)
    try:
        await one.tick()
        await two.tick()
        assert one.evaluations == two.evaluations == 0  # no labels: nothing to read
        for i in range(3):
            _label(r, i, 1)
        for _ in range(3):
            await one.tick()
            await two.tick()
        assert (one.evaluations, two.evaluations) == (1, 0)  # once, by the lease's holder
        assert _labelled(r) == 3
        _label(r, 3, 0)  # a label another process took: the holder sees the stream move
        await one.tick()
        await two.tick()
        assert (one.evaluations, two.evaluations) == (2, 0) and _labelled(r) == 4
        dep = cache.deployments[DEMO_DEPLOYMENT]
        cache.deployments[DEMO_DEPLOYMENT] = dataclasses.replace(dep, revision=dep.revision + 1)
        await one.tick()  # a new revision: its current versions may have changed
        assert one.evaluations == 3
        await one.release()  # a holder that stops hands over at once
        _label(r, 4, 1)
        await two.tick()
        assert two.evaluations == 1 and _labelled(r) == 5
        await one.tick()
        assert one.evaluations == 3
    finally:
        await client.aclose()


async def test_a_quiet_deployment_is_looked_at_after_the_quiet_wait_and_labels_every_tick(
    r: redis.Redis, redis_url: str, demo_registry: ModelRegistry
) -> None:
    """A look that found no new label waits ``quiet_s`` for the next; one that found a label
    looks again at the next tick; a new revision is looked at once."""
    cache: Any = SimpleNamespace(
        deployments={DEMO_DEPLOYMENT: demo_deployment(demo_registry, Schedule())}
    )

    async def classes(_name: str, _version: int) -> list[int]:
        return [0, 1]

    client = await connect_async(redis_url)
    one = LiveAccuracy(
        client, cache, "gw-1", window=100, classes_of=classes, tick_s=0.05, quiet_s=0.4
    )
    try:
        _label(r, 0, 1)
        await one.tick()
        assert one.evaluations == 1  # never looked at: at once
        t0 = time.monotonic()
        await asyncio.sleep(0.06)
        await one.tick()  # the label it evaluated: nothing new, so quiet from here
        _label(r, 1, 0)
        await asyncio.sleep(0.06)
        await one.tick()
        if time.monotonic() - t0 < 0.3:  # a loaded host may have slept through the wait
            assert one.evaluations == 1
        await asyncio.sleep(max(0.0, t0 + 0.45 - time.monotonic()))
        await one.tick()
        assert one.evaluations == 2 and _labelled(r) == 2  # within the quiet wait
        _label(r, 2, 1)
        await asyncio.sleep(0.06)
        await one.tick()
        assert one.evaluations == 3  # the last look found a label: the next tick looks
        await asyncio.sleep(0.06)
        await one.tick()  # nothing new: quiet again
        dep = cache.deployments[DEMO_DEPLOYMENT]
        cache.deployments[DEMO_DEPLOYMENT] = dataclasses.replace(dep, revision=dep.revision + 1)
        await asyncio.sleep(0.06)
        await one.tick()
        assert one.evaluations == 4  # a new revision: looked at, quiet or not
    finally:
        await client.aclose()
