"""Input partitions as names and state (pure): stable names, spread evenly over the cluster's
slots, a request's partition stable for its id, and a count change that keeps the old streams
read until the deployment is recreated."""

import binascii
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import DuplicateRequest
from gateway.dataplane.service import PredictionService
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import Deployment, DeploymentConflict, ModelRef, with_partitions
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.bus.appender import StreamAppender
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import connect_async
from rendezvous.request_ids import minted_ms, new_request_id
from rendezvous.schedule import Schedule
from rendezvous.spec import FeatureSpec


def slot(key: str) -> int:
    tag = key[key.index("{") + 1 : key.index("}")]
    return binascii.crc_hqx(tag.encode(), 0) % names.SLOTS


@pytest.mark.parametrize("partitions", [2, 3, 4, 6, 16, 64])
def test_partitions_spread_evenly_over_the_slots(partitions: int) -> None:
    streams = names.input_streams("breast-cancer", partitions)
    assert streams[0] == names.input_stream("breast-cancer") == "rdv:{breast-cancer}:in"
    assert len(set(streams)) == partitions
    assert streams == names.input_streams("breast-cancer", partitions)  # stable
    base = slot(streams[0])
    spacing = names.SLOTS / partitions
    for k, stream in enumerate(streams):
        offset = (slot(stream) - base) % names.SLOTS
        assert abs(offset - k * spacing) <= spacing / 8 + 1, (k, offset)
    # so with as many equal slot ranges (masters) as partitions, one partition in each
    owners = {(slot(s) - base + int(spacing / 2)) % names.SLOTS // int(spacing) for s in streams}
    assert len(owners) == partitions


def test_a_request_keeps_its_partition_and_partitions_share_out_requests() -> None:
    ids = [f"req-{i}" for i in range(3000)]
    counts = [0, 0, 0]
    for rid in ids:
        k = names.partition_for(rid, 3)
        assert k == names.partition_for(rid, 3)
        counts[k] += 1
    assert min(counts) > 900
    assert names.partition_for("anything", 1) == 0
    key = names.request_id_key(names.input_stream("d", 2, 3), "r-1")
    assert key.endswith(":rid:r-1") and key[: key.index("}")] in names.input_stream("d", 2, 3)


def test_made_up_ids_say_when_and_spread_and_a_callers_id_has_a_key_per_count() -> None:
    made = [new_request_id(1_796_000_000_000) for _ in range(3000)]
    assert len(set(made)) == 3000 and all(len(rid) == 32 for rid in made)
    assert {minted_ms(rid) for rid in made} == {1_796_000_000_000}
    counts = [0, 0, 0]
    for rid in made:  # a shared time prefix does not skew the partitions
        counts[names.partition_for(rid, 3)] += 1
    assert min(counts) > 900
    for not_made in ("req-1", "0" * 31, "G" * 32, "A" * 32, "+" + "0" * 31, " 1" + "0" * 30):
        assert minted_ms(not_made) is None, not_made
    keys = names.request_id_keys("d", "r-1", [3, 1, 3])
    assert keys == [names.request_id_key(names.input_stream("d", names.partition_for("r-1", 3), 3),
                                         "r-1"),
                    names.request_id_key(names.input_stream("d"), "r-1")]  # fmt: skip


def test_partition_names_refuse_what_is_not_a_partition() -> None:
    with pytest.raises(names.InvalidName):
        names.input_stream("d", 3, 3)
    with pytest.raises(names.InvalidName):
        names.input_stream("d", 1, names.MAX_PARTITIONS + 1)


def _dep(partitions: int = 1) -> Deployment:
    spec = FeatureSpec(names=("a", "b"))
    return Deployment("d", {names.REAL: ModelRef("m", 1)}, spec, partitions=partitions)


def test_a_count_change_keeps_the_old_streams_read_and_round_trips() -> None:
    three = with_partitions(_dep(), 3)
    assert three.input_streams == names.input_streams("d", 3) and three.past_partitions == ()
    two = with_partitions(three, 2)
    assert two.partitions == 2 and two.past_partitions == (3,)
    assert two.input_streams[:2] == names.input_streams("d", 2)
    assert set(names.input_streams("d", 3)) <= set(two.input_streams)  # drained, not dropped
    assert Deployment.from_json(two.to_json()) == two
    assert two.input_stream_for("r") in names.input_streams("d", 2)
    with pytest.raises(DeploymentConflict):
        with_partitions(two, 2)
    with pytest.raises(ValueError, match="partitions"):
        _dep(0)


def test_new_partitions_exist_before_the_state_that_names_them(
    r: redis.Redis, demo_registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The groups of partitions beyond the first were made after the state naming them was
    written: a gateway that read the new state in between sent a request to a stream not
    made yet, and answered 503 "input stream is gone" (1 of 805 through a change from 3
    partitions to 2, in a loaded CI run). They are made before it now: here the follow-up
    (``ensure_groups``) never runs, as if the gateway had read the state first."""
    import models.deployment_store as deployment_store

    store = DeploymentStore(r)
    store.create(demo_deployment(demo_registry, Schedule()))
    monkeypatch.setattr(deployment_store, "ensure_groups", lambda client, dep: None)
    for partitions in (3, 2):
        _before, after = store.update(DEMO_DEPLOYMENT, lambda d, n=partitions: with_partitions(
            d, n), action="set-partitions", actor="test")  # fmt: skip
        for stream in after.published_streams:
            groups = {g["name"].decode() for g in r.xinfo_groups(stream)}
            assert set(after.groups()) <= groups, (partitions, stream, groups)


def test_a_change_of_count_remembers_where_caller_ids_were_taken(
    demo_registry: ModelRegistry,
) -> None:
    """A caller's request id is taken under its partition's tag, which a change of count
    moves: the counts left are kept with when they were left (beyond their streams' drain),
    and the keys an id may still be taken under are those of counts left within the TTL."""
    dep = demo_deployment(demo_registry, Schedule())
    three = with_partitions(dep, 3)
    two = with_partitions(three, 2)
    assert set(two.left_partitions) == {1, 3} and not dep.left_partitions
    assert Deployment.from_json(two.to_json()).left_partitions == two.left_partitions
    ids = [f"caller-{i}" for i in range(60)]
    for rid in ids:
        now = names.request_id_key(two.input_stream_for(rid), rid)
        earlier = two.earlier_id_keys(rid, 0)
        expect = set(names.request_id_keys(dep.name, rid, [1, 3])) - {now}
        assert set(earlier) == expect and now not in earlier
    assert sum(1 for rid in ids if two.earlier_id_keys(rid, 0)) > 30
    # left before the TTL's start: no longer looked at
    assert all(not two.earlier_id_keys(rid, max(two.left_partitions.values()) + 1) for rid in ids)
    # a retired count's streams are no longer read, but its ids are still looked for
    assert with_partitions(two, 1).left_partitions.keys() == {1, 2, 3}


async def test_a_jobs_later_run_finds_the_id_its_earlier_run_took_before_a_change_its_own(
    r: redis.Redis, redis_url: str
) -> None:
    """A job's predict tried again (a 503 for a moment, or its gateway gone) after a change of
    count found its own earlier run's key under the count left, and failed 409 on its own
    request id; the same key under the same count is its own (``unique_owner``). Another job
    or a predict under the id is refused as before."""
    dep = with_partitions(_dep(1), 3)
    rid = next(f"j-{i}" for i in range(50) if names.partition_for(f"j-{i}", 3) != 0)
    assert dep.earlier_id_keys(rid, 0) == [names.request_id_key(names.input_stream("d"), rid)]
    r.set(dep.earlier_id_keys(rid, 0)[0], "job-1", px=60_000)  # its first run, under 1
    client = await connect_async(redis_url, timeout_s=2.0)
    cache = DeploymentCache(client)
    cache.deployments["d"] = dep
    appender = StreamAppender(Router(aioredis.Redis.from_url(redis_url), timeout_s=2.0))

    class Reached(Exception):
        """The request passed its id's checks: the rendezvous opens its mailbox."""

    class Rendezvous:
        reply_to = "r"

        def open(self, *args: Any, **kwargs: Any) -> None:
            raise Reached

    service = PredictionService(cache, cast(Any, Rendezvous()), appender, max_rows=8,
                                max_in_flight=4, max_backlog=100)  # fmt: skip
    body = b'{"instances": [[1, 2]]}'
    try:
        with pytest.raises(Reached):
            await service.predict("d", body, rid, job="job-1")
        with pytest.raises(DuplicateRequest):
            await service.predict("d", body, rid, job="job-2")
        with pytest.raises(DuplicateRequest):
            await service.predict("d", body, rid)
    finally:
        await client.aclose()
        await appender.client.close()
