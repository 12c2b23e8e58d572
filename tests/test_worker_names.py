"""Worker hosts started by hand, as on several machines (real processes, real Redis): two that
serve the same roles need names of their own. Under one name (two identical ``rdv worker``)
they shared every consumer: one heartbeat, so a dead one was never missed, and counters that
overwrote each other (found by a helper's probe of a multi-process deployment)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from models.name_owner import WORKER_HOST, owner_key
from models.train import DEMO_DEPLOYMENT
from processes import RdvProcess, bodies, launch_system, wait_until
from rendezvous import names
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration


def test_two_worker_hosts_of_the_same_roles_need_names_of_their_own(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, Schedule()) as system:

        def live_reals() -> set[str]:
            members = system.r.zrangebyscore(names.workers_key(DEMO_DEPLOYMENT),
                                             time.time() - 3, "+inf")  # fmt: skip
            return {m.decode() for m in members if m.decode().startswith("real|")}

        system.start("host-0", "worker")
        wait_until(lambda: live_reals() == {"real|real-0"}, 30, "the first host's real")
        twin = RdvProcess(["worker"], system.env, system.logs / "twin.log")
        assert twin.proc.wait(30) == 1, twin.log_text()[-2000:]
        twin.stop()
        said = twin.log_text().strip().splitlines()[-1]
        assert re.fullmatch(r"rdv worker: another worker host runs as '0 \(consumers <role>-0 "
                            r"of every deployment, shard 0/1\)' \(.+\): give each its own --name",
                            said), said  # fmt: skip
        # nor a host of the answering roles, which reads under the same consumer names (it
        # ran beside the other: a helper's README probe)
        answering = RdvProcess(["worker", "--roles", "answering"], system.env,
                               system.logs / "answering.log")  # fmt: skip
        assert answering.proc.wait(30) == 1, answering.log_text()[-2000:]
        answering.stop()
        assert "give each its own --name" in answering.log_text()

        system.start("host-b", "worker", "--name", "b")
        wait_until(lambda: live_reals() == {"real|real-0", "real|real-b"}, 30, "both reals")
        group = system.r.xinfo_consumers(names.input_stream(DEMO_DEPLOYMENT), "model:real")
        assert {c["name"].decode() for c in group} == {"real-0", "real-b"}
        assert all(system.predict(b).status_code == 200 for b in bodies(10))

        # stopped cleanly, a host lets go of its name: its successor starts at once
        held = owner_key("0 (consumers <role>-0 of every deployment, shard 0/1)", WORKER_HOST)
        assert system.r.exists(held)
        system.stop("host-0")
        assert not system.r.exists(held)
        system.start("host-0-again", "worker")
        wait_until(lambda: "real|real-0" in live_reals(), 30, "the successor's real")
        assert "another worker host" not in system.procs["host-0-again"].log_text()


def test_a_host_restarted_in_its_supervisor_slot_takes_its_name_back_at_once(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Under ``rdv serve`` a crashed host is restarted in its slot: it holds its name under the
    slot (``RENDEZVOUS_SUPERVISED_AS``), so it need not wait out the dead one's hold. Here the
    dead one's hold is made to last: only the slot's token gets past it."""
    from gateway.cli.supervisor import SUPERVISED_AS

    with launch_system(redis_url, demo_data_dir, tmp_path_factory, Schedule(),
                       **{SUPERVISED_AS: "4242/worker-host-0"}) as system:  # fmt: skip
        held = owner_key("0 (consumers <role>-0 of every deployment, shard 0/1)", WORKER_HOST)
        first = system.start("host", "worker")
        wait_until(lambda: system.r.exists(held), 30, "the first host's hold")
        first.kill()
        first.proc.wait(10)
        assert system.r.persist(held)  # the dead one's hold, for good
        system.procs.pop("host")
        again = system.start("host-again", "worker")
        wait_until(lambda: "worker host (all roles" in again.log_text() or not again.alive(), 30,
                   "the restarted host to serve, or to give up")  # fmt: skip
        assert again.alive(), again.log_text()[-1000:]
        assert system.r.get(held).decode().endswith("-4242/worker-host-0")


def test_a_held_name_is_renewed_until_the_holder_stops_on_either_bus(bus_url: str) -> None:
    """A worker host's renewal thread sent a raw ``SET`` that redis-py's cluster client could
    not route (a bytes command name): the thread ended at once, the hold lapsed after 5 s and
    a second host under the same ``--name`` was never refused on a cluster (a helper's probe)."""
    import threading

    from models.name_owner import OWNER_TTL_MS, keep_held, take_name
    from rendezvous.bus.connection import connect

    client = connect(bus_url)
    name, token = f"renewal-{time.time_ns()}", "token-1"
    key = owner_key(name, WORKER_HOST)
    stop = threading.Event()
    try:
        take_name(client, name, token, kind=WORKER_HOST)
        keep_held(client, name, token, WORKER_HOST, stop)
        time.sleep(2.6)  # past two renewals: unrenewed, 2,400 ms would be left
        assert client.pttl(key) > OWNER_TTL_MS - 1000
        assert client.get(key) == token.encode()
        stop.set()
        wait_until(lambda: not client.exists(key), 5, "the name let go at the stop")
    finally:
        stop.set()
        client.close()


def test_a_host_whose_name_another_took_stops_on_either_bus(bus_url: str) -> None:
    """A host paused past its hold while a successor took its name: the renewal, a plain SET,
    took it back on resuming, and both hosts ran under one name for good (shared heartbeats,
    counters overwriting each other: a helper's multi-host probe). It stops instead."""
    import threading

    from models.name_owner import keep_held, take_name
    from rendezvous.bus.connection import connect

    client = connect(bus_url)
    name = f"lost-{time.time_ns()}"
    key = owner_key(name, WORKER_HOST)
    stop = threading.Event()
    try:
        take_name(client, name, "token-1", kind=WORKER_HOST)
        keep_held(client, name, "token-1", WORKER_HOST, stop)
        client.set(key, "successor", px=5000)
        wait_until(stop.is_set, 5, "the host to stop")
        time.sleep(1.2)
        assert client.get(key) == b"successor"
    finally:
        stop.set()
        client.close()
