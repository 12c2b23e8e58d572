"""A deployment state a process cannot read (written by a newer version in a rolling upgrade,
or damaged) is left out by the processes that follow every deployment, said once, never
raised: raised, one such state stopped a log bin archiving every deployment and had worker
hosts restarting in a loop (found by a helper's upgrade probe). Real Redis."""

from __future__ import annotations

import json
import logging

import pytest
import redis

from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import Deployment, with_schedule
from models.logbin_states import DeploymentStates
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.bus.blocking_router import BlockingRouter
from rendezvous.bus.connection import connect
from rendezvous.schedule import Schedule
from rendezvous.spec import FeatureSpec, FeatureStats


def test_an_unreadable_state_is_left_out_and_the_others_followed(
    r: redis.Redis, redis_url: str, demo_registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeploymentStore(r)
    store.create(demo_deployment(demo_registry, Schedule()))
    good = r.get(names.deployment_key(DEMO_DEPLOYMENT))
    assert good is not None
    r.set(names.deployment_key("newer"), good.replace(b'"roles"', b'"rolez"'))
    r.set(names.revision_key("newer"), 1)
    r.sadd(names.DEPLOYMENTS_SET, "newer")

    bus = BlockingRouter(connect(redis_url), timeout_s=2.0)
    states = DeploymentStates(bus)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # said once, not at every look
            read = states.read([DEMO_DEPLOYMENT, "newer"])
            assert set(read) == {DEMO_DEPLOYMENT}
            assert set(store.current({})) == {DEMO_DEPLOYMENT}
    said = [m for m in caplog.messages if "newer" in m and "cannot read" in m]
    assert len(said) == 2, said  # the log bin's reader and the store's, once each

    # once readable again it is followed
    r.set(names.deployment_key("newer"), good.replace(DEMO_DEPLOYMENT.encode(), b"newer"))
    assert set(states.read([DEMO_DEPLOYMENT, "newer"])) == {DEMO_DEPLOYMENT, "newer"}
    assert "newer" in store.current({})


def test_what_a_newer_version_added_is_written_back_as_it_came() -> None:
    """Rewriting a state (a change through an older gateway in a rolling upgrade) dropped the
    fields it did not know: the decile bins' shares the next version added were lost for
    good (found by a helper's upgrade probe). Kept now, at every level a version may add to."""
    spec = FeatureSpec(("a",), {"a": FeatureStats(0.0, 1.0, -1.0, 1.0, {"0.5": 0.0})})
    doc = {
        "name": "d",
        "revision": 3,
        "roles": {"real": {"name": "m", "version": 1}},
        "schedule": {"hedge_after_ms": 20},
        "feature_spec": {**spec.to_dict(), "layout_hint": [1, 2]},
        "owner": "team-a",
    }
    doc["feature_spec"]["stats"]["a"]["skew"] = 0.3
    changed = with_schedule(Deployment.from_json(json.dumps(doc)), {"grace_ms": 150.0})
    again = json.loads(changed.to_json())
    assert again["owner"] == "team-a" and again["feature_spec"]["layout_hint"] == [1, 2]
    assert again["feature_spec"]["stats"]["a"]["skew"] == 0.3
    assert again["schedule"]["grace_ms"] == 150.0 and again["schedule"]["hedge_after_ms"] == 20
