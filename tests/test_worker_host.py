"""One worker process hosting many (deployment, role) models, following the deployments:
against a real Redis (a single node and the cluster) and the real demo ONNX models."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import Deployment, ModelRef
from models.registry import ModelRegistry
from models.train import demo_data
from models.worker import ModelWorker
from models.worker_host import RoleKind, Selection, WorkerHost, client_per_worker, hosted_consumer
from processes import wait_until
from rendezvous import names
from rendezvous.bus.connection import Client, connect
from rendezvous.envelope import ModelResult, RequestEnvelope, decode_results
from rendezvous.schedule import Schedule

REPLY = names.reply_stream("host-test")


def _deployment(registry: ModelRegistry, name: str, **schedule: object) -> Deployment:
    dep = demo_deployment(registry, Schedule(**schedule))  # type: ignore[arg-type]
    return dataclasses.replace(dep, name=name)


def _publish(client: Client, deployment: str, rid: str) -> None:
    now = time.time() * 1000
    env = RequestEnvelope(request_id=rid, deployment=deployment, reply_to=REPLY,
                          deadline_ms=int(now + 60_000), enqueued_ms=now, raw=b"{}",
                          features=demo_data().x_test[:1].astype(np.float32),
                          spec_version="fs-test")  # fmt: skip
    client.xadd(names.input_stream(deployment), env.encode())  # type: ignore[arg-type]


def _results(client: Client) -> dict[tuple[str, str], ModelResult]:
    """(request id, role) -> its result, from the reply stream."""
    out = {}
    for _id, fields in client.xrange(REPLY):  # type: ignore[union-attr]
        if b"hello" not in fields:
            batch, _ = decode_results(fields)
            out.update({(res.request_id, res.role): res for res in batch})
    return out


@pytest.fixture
def client(bus_url: str) -> Iterator[Client]:
    c = connect(bus_url)  # on a flushed keyspace: a host serves every deployment it finds
    if isinstance(c, redis.RedisCluster):
        c.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        c.flushdb()
    c.xadd(REPLY, {b"hello": b"1"})
    yield c
    c.close()


def test_one_process_hosts_every_role_of_every_deployment_and_follows_them(
    bus_url: str, client: Client, demo_registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Two deployments of a real and a canary each: four models in one host, every request
    scored by each of its deployment's roles with the right version; a challenger added is
    served within a refresh, beside the canary in the canary's thread (a deployment's shadow
    roles share one), a role removed is retired (its thread ends, or it leaves its thread), a
    model that cannot load is retried with backoff without touching the others, the canary
    beside it included, and a stop ends every thread."""
    store = DeploymentStore(client)
    for name in ("alpha", "beta"):
        store.create(_deployment(demo_registry, name))

    def build(c: Client, deployment: str, role: str) -> ModelWorker:
        return ModelWorker(c, demo_registry, deployment=deployment, role=role,
                           consumer=f"{role}-host", block_ms=100)  # fmt: skip

    host = WorkerHost(store, client_per_worker(lambda: connect(bus_url), build), refresh_s=0.1,
                      consumer_of=lambda role: f"{role}-host")  # fmt: skip
    stop = threading.Event()
    runner = threading.Thread(target=host.run, args=(stop,))
    caplog.set_level(logging.INFO, logger="models")
    runner.start()
    try:
        wait_until(lambda: len(host.hosted) == 4, 10, "four hosted models")
        for dep in ("alpha", "beta"):
            _publish(client, dep, f"{dep}-1")
        want = {(f"{d}-1", role) for d in ("alpha", "beta") for role in ("real", "canary")}
        wait_until(lambda: want <= set(_results(client)), 15, "every role of both to score")
        got = _results(client)
        assert {got[("alpha-1", "real")].version, got[("alpha-1", "canary")].version} == {2, 1}
        assert got[("beta-1", "real")].deployment == "beta"

        def add(dep: Deployment, role: str, version: int) -> Deployment:
            return dataclasses.replace(dep, roles={**dep.roles, role: ModelRef(
                dep.roles["real"].name, version)})  # fmt: skip

        store.update("alpha", lambda d: add(d, "ch1", 1), action="test", actor="test")
        wait_until(lambda: ("alpha", "ch1") in host.serving(), 10, "the challenger to be hosted")
        assert set(host.hosted) == {(d, r) for d in ("alpha", "beta") for r in ("real", "canary")}
        assert host.hosted[("alpha", "canary")].worker.serving_beside() == ("ch1",)
        canary = host.hosted[("beta", "canary")]
        store.update("beta", lambda d: dataclasses.replace(
            d, roles={"real": d.roles["real"]}), action="test", actor="test")  # fmt: skip
        wait_until(lambda: ("beta", "canary") not in host.hosted, 10, "the canary to retire")
        assert not canary.thread.is_alive()
        _publish(client, "alpha", "alpha-2")
        wait_until(lambda: ("alpha-2", "ch1") in _results(client), 15, "the challenger to score")

        # A challenger leaves the canary's thread, which goes on.
        beside = host.hosted[("alpha", "canary")]
        store.update("alpha", lambda d: dataclasses.replace(
            d, roles={r: m for r, m in d.roles.items() if r != "ch1"}), action="test",
            actor="test")  # fmt: skip
        wait_until(lambda: ("alpha", "ch1") not in host.serving(), 10, "the challenger to leave")
        assert host.hosted[("alpha", "canary")] is beside and beside.thread.is_alive()

        # A shadow role whose model version is not in the registry fails to load: retried
        # with backoff by the worker it would join, while the canary there goes on scoring.
        store.update("alpha", lambda d: add(d, "ghost", 99), action="test", actor="test")
        wait_until(lambda: beside.worker.load_failures >= 2, 15, "the broken model retried twice")
        assert "trying again in" in caplog.text and ("alpha", "ghost") not in host.serving()
        _publish(client, "alpha", "alpha-3")
        wait_until(lambda: {("alpha-3", "real"), ("alpha-3", "canary")} <= set(_results(client)),
                   15, "alpha's real and canary to score")  # fmt: skip
        # A role that answers callers and cannot load: its thread is restarted with backoff.
        store.update("beta", lambda d: dataclasses.replace(d, roles={**d.roles, "ab": ModelRef(
            d.roles["real"].name, 99)}, schedule=Schedule(splits=(("ab", 0.1),))), action="test",
            actor="test")  # fmt: skip
        wait_until(lambda: host.restarts >= 2, 15, "the broken model to be retried twice")
        assert "restarting it in" in caplog.text
        # said in one line with the registry's folder, not a traceback at every restart
        loads = [r for r in caplog.records if "cannot load its model" in r.getMessage()]
        assert loads and not any(r.exc_info for r in loads), loads
        assert "version 99 is not in the registry at" in loads[0].getMessage()
        _publish(client, "beta", "beta-2")
        wait_until(lambda: ("beta-2", "real") in _results(client), 15, "beta's real to score")
        threads = [h.thread for h in host.hosted.values()]
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive() and host.hosted == {}
    assert not [t for t in threads if t.is_alive()]


@pytest.mark.pure
def test_a_selection_splits_answering_from_shadowing_roles_and_shards_them(
    demo_registry: ModelRegistry,
) -> None:
    """Real and a challenger with an A/B split answer callers; the canary and a shadowing
    challenger do not. Shards split the pairs between hosts, each pair to exactly one."""
    dep = _deployment(demo_registry, "alpha")
    dep = dataclasses.replace(dep, roles={**dep.roles, "ch1": dep.roles["real"],
                                          "ch2": dep.roles["canary"]},
                              schedule=Schedule(splits=(("ch1", 0.5),)))  # fmt: skip
    answering = {r for r in dep.role_names if Selection("answering").picks(dep, r)}
    shadow = {r for r in dep.role_names if Selection("shadow").picks(dep, r)}
    assert answering == {"real", "ch1"} and shadow == {"canary", "ch2"}
    assert not Selection("all", deployment="beta").picks(dep, "real")
    many = [_deployment(demo_registry, f"d{i}") for i in range(40)]
    owners = [[s for s in range(3) if Selection("all", shard=s, shards=3).picks(d, "real")]
              for d in many]  # fmt: skip
    assert all(len(o) == 1 for o in owners) and {o[0] for o in owners} == {0, 1, 2}
    with pytest.raises(ValueError, match="shard"):
        Selection(shard=2, shards=2)


def _move(
    store: DeploymentStore, hosts: list[WorkerHost], split: tuple[tuple[str, float], ...]
) -> None:
    """Give ch1 this A/B split (none: it only shadows) and wait until it is served so: in a
    thread of its own when it answers, else beside the canary."""
    store.update("alpha", lambda d: dataclasses.replace(d, schedule=Schedule(splits=split)),
                 action="test", actor="test")  # fmt: skip
    key = ("alpha", "ch1")

    def moved() -> bool:
        alone = [h for h in hosts if key in h.hosted]
        beside = [h for h in hosts if key in h.serving() and key not in h.hosted]
        return (len(alone), len(beside)) == ((1, 0) if split else (0, 1))

    wait_until(moved, 10, "the challenger to move")


@pytest.mark.parametrize("layout", ["one host", "two hosts"])
def test_a_shadow_role_that_starts_answering_is_scored_once_through_the_move(
    bus_url: str, client: Client, demo_registry: ModelRegistry, layout: str
) -> None:
    """A challenger shadowing beside the canary gets an A/B split while requests keep coming,
    loses it and gets it again: it moves from the canary's thread to one of its own and back,
    within one host (``--roles all``) or between an answering and a shadow host (``rdv
    serve``'s shared layout), and every request is scored by it exactly once. Within a host,
    its own thread starts only once the shared one has let it go (acks of the batch in hand
    sent); between hosts, the two name its consumer apart, so neither re-reads as its own
    pending entries the batch the other has in hand."""
    store = DeploymentStore(client)
    dep = _deployment(demo_registry, "alpha")
    store.create(dataclasses.replace(dep, roles={**dep.roles, "ch1": dep.roles["real"]}))

    class SlowWorker(ModelWorker):
        """The canary's worker: a batch with entries in hand takes 50 ms, so that a move lands
        while one is pending under ch1's consumer."""

        def process(self, batch: Any) -> int:
            if batch.entries:
                time.sleep(0.05)
            return super().process(batch)

    def host(kind: RoleKind) -> WorkerHost:
        def build(c: Client, deployment: str, role: str) -> ModelWorker:
            worker = SlowWorker if role == "canary" else ModelWorker
            return worker(c, demo_registry, deployment=deployment, role=role, block_ms=100,
                          consumer=hosted_consumer(role, kind))  # fmt: skip

        make = client_per_worker(lambda: connect(bus_url), build)
        return WorkerHost(store, make, Selection(kind), refresh_s=0.05)

    hosts = [host("all")] if layout == "one host" else [host("answering"), host("shadow")]
    stop, sending = threading.Event(), threading.Event()
    sent: list[str] = []

    def send() -> None:
        with connect(bus_url) as c:
            while not sending.is_set() and len(sent) < 3000:
                rid = f"r{len(sent)}"
                _publish(c, "alpha", rid)
                sent.append(rid)
                time.sleep(0.005)

    runners = [threading.Thread(target=h.run, args=(stop,)) for h in hosts]
    sender = threading.Thread(target=send)
    for runner in runners:
        runner.start()
    try:
        _move(store, hosts, ())
        sender.start()
        wait_until(lambda: len(sent) > 100, 10, "requests flowing")
        for split in ((("ch1", 0.2),), (), (("ch1", 0.3),)):
            _move(store, hosts, split)
            mark = len(sent)
            wait_until(lambda: len(sent) > mark + 50, 10, "requests after the move")  # noqa: B023
        sending.set()
        sender.join(10)

        def scored() -> list[str]:
            return [res.request_id for _id, fields in client.xrange(REPLY)  # type: ignore[union-attr]
                    if b"hello" not in fields for res in decode_results(fields)[0]
                    if res.role == "ch1"]  # fmt: skip

        wait_until(lambda: set(scored()) >= set(sent), 20, "every request scored by ch1")
        got = scored()
        twice = sorted({rid for rid in got if got.count(rid) > 1})
        assert not twice, f"{len(twice)} requests scored twice by ch1: {twice[:10]}"
    finally:
        sending.set()
        stop.set()
        for runner in runners:
            runner.join(30)
