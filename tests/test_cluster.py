"""What only a Redis Cluster can show, with real processes on the suite's real cluster (three
masters, three replicas): a master killed under load (the deployment's, and one partition's
while the other partitions go on), several members of each consumer group
sharing a deployment (one of them killed), and a partitioned deployment spread over the masters
(also on the single node: partitions are not only for clusters). The figures are printed
(``pytest -s``)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.archive import ArchiveReader
from models.deployment_store import DeploymentStore
from models.deployments import with_partitions
from models.train import DEMO_DEPLOYMENT
from processes import PREDICT, Load, System, bodies, launch_system, report, wait_until
from rendezvous import names
from rendezvous.bus.local_cluster import LocalCluster
from rendezvous.decision import decode_entries
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration

SETTLE_S = 1.0
"""After a failover, how long after the first answer every gateway process must answer too."""
SCHEDULE = Schedule(real_deadline_ms=50, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)
CLAIM_IDLE_MS = 1000


def archived_ids(system: System) -> list[str]:
    """Every archived request id, as often as it was archived (from every log-bin consumer's
    files: they share the data folder)."""
    reader = ArchiveReader(system.data_dir / "logbin")
    return [r["request_id"] for r in reader.records(DEMO_DEPLOYMENT) if "request_id" in r]


def owner(cluster: LocalCluster, key: str) -> int:
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        return int(client.get_node_from_key(key).port)
    finally:
        client.close()


def promoted_when_killed(cluster: LocalCluster, master: int) -> Callable[[], bool]:
    """Whether ``master``'s replica is a master now, asked of the replica itself: the moment a
    gateway can write again. (A cluster client's view, asked from this busy test process,
    saw it up to 0.6 s late, and requests already answered 200 counted as sent before it.)"""
    nodes = cluster.cluster_nodes()
    master_id = next(n["id"] for n in nodes if n["port"] == master)
    replica = next(n["port"] for n in nodes if n["master"] == master_id)

    def promoted() -> bool:
        client = cluster.client(replica)
        try:
            role = client.execute_command("ROLE")[0]
        finally:
            client.close()
        return role in (b"master", "master")

    return promoted


@pytest.fixture
def system(
    redis_cluster: LocalCluster, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    redis_cluster.wait_healthy(30.0)
    with launch_system(redis_cluster.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS)) as sys:  # fmt: skip
        yield sys


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_master_killed_under_load_is_ridden_out_without_500_or_hang(
    redis_cluster: LocalCluster,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    wait_replicas: int,
) -> None:
    """With RDV_WAIT_REPLICAS=1 a 200 means the input reached a replica: nothing answered may
    then be missing from the archive after the failover (and the shard answers 503 until it has
    a replica again); without it, a few may."""
    redis_cluster.wait_healthy(30.0)
    with launch_system(redis_cluster.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
                       RDV_WAIT_REPLICAS=str(wait_replicas)) as system:  # fmt: skip
        _kill_a_master_under_load(system, redis_cluster, wait_replicas)


def _kill_a_master_under_load(system: System, redis_cluster: LocalCluster, waits: int) -> None:
    system.start_worker("real")
    system.start_worker("canary")
    victim = owner(redis_cluster, names.input_stream(DEMO_DEPLOYMENT))
    try:
        # A count bound well past what 14 s can send: 503s come fast during the election
        # (3,287 in 3.4 s once), and a load that stopped at 5,000 left nothing to check after
        # the recovery (a CI flake).
        with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=14, prefix="fo",
                  max_requests=50_000) as load:  # fmt: skip
            promoted = promoted_when_killed(redis_cluster, victim)
            time.sleep(1.5)
            redis_cluster.kill(victim)
            killed_at = time.monotonic()
            wait_until(promoted, 15, "a replica to take the slot over")
            elected_s = time.monotonic() - killed_at
            if waits:
                # The promoted replica has no replica of its own until the dead master comes
                # back as one: meanwhile every answer is 503 (its input would not survive a
                # second failure). Restarted, it rejoins as a replica and answers resume.
                redis_cluster.restart(victim)
            wait_until(lambda: any(r["status"] == 200 and r["t"] > time.monotonic() - 0.5
                                   for r in load.results[-20:]), 20, "recovery")  # fmt: skip
            recovered_at = time.monotonic()
            time.sleep(SETTLE_S + 1.5)
        ok = load.ok_ids()
        archived = set(archived_ids(system))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ok <= archived:
            time.sleep(0.2)
            archived = set(archived_ids(system))
        statuses = {r["status"] for r in load.results}
        # Each gateway process finds the new master by itself, within a few tenths of a second
        # of the other (its search asks every 0.1 s): sent a second after the first 200, every
        # request must be answered.
        late = [r for r in load.results if r["t"] > recovered_at + SETTLE_S]
        # Sent while the slot had no master, answered well before the election's end: a
        # quick 503 (the gateway does not sit out the cluster client's search).
        electing = [r for r in load.results
                    if killed_at + 0.1 < r["t"] < killed_at + elected_s - 0.6]  # fmt: skip
        answered_after = [r["t"] + r["ms"] / 1000 - killed_at for r in load.results
                          if r["status"] == 200 and r["t"] > killed_at + 0.1]  # fmt: skip
        first_200_s = min(answered_after, default=-1.0)
        figures = {**load.figures(), "elected_s": round(elected_s, 2),
                   "first_200_s": round(first_200_s, 2),
                   "outage_s": round(recovered_at - killed_at, 2),
                   "2xx_missing_from_archive": len(ok - archived),
                   "slowest_ms": round(max(r["ms"] for r in load.results))}  # fmt: skip
        report(f"master killed under load (cluster, RDV_WAIT_REPLICAS={waits})", figures)
        assert statuses <= {200, 503, 504}, figures  # no 500, no request left unanswered
        assert all(r["retry_after"] for r in load.results if r["status"] == 503)
        # Every one answered before the new master was found (none sat out the election), and
        # quickly as a rule: on a loaded 2-core machine one answer may stretch past a second.
        assert all(r["status"] == 503 for r in electing), electing[:5]
        assert all(r["t"] + r["ms"] / 1000 < killed_at + elected_s for r in electing), figures
        assert not electing or statistics.median(r["ms"] for r in electing) < 500, figures
        # None sent in that window: either the election was quick, or every load thread was
        # still in a request sent before the kill (with RDV_WAIT_REPLICAS, one waits up to
        # 1.5 s for its replica: all of them did in a CI run, and the window passed unseen)
        freed = min((r["t"] + r["ms"] / 1000 for r in load.results
                     if r["t"] <= killed_at + 0.1 < r["t"] + r["ms"] / 1000),
                    default=killed_at)  # fmt: skip
        assert electing or elected_s < 1.5 or freed >= killed_at + elected_s - 0.6, figures
        assert late and all(r["status"] == 200 for r in late), [r for r in late if r["status"]
                                                                 != 200][:5]  # fmt: skip
        assert all(p.alive() for p in system.procs.values())
        # Replication is asynchronous: what the master took in its last moments may be gone.
        # It is measured, not promised; bounded here so that a real regression shows.
        assert len(ok - archived) <= (0 if waits else max(5, len(ok) // 100)), figures
    finally:
        if not redis_cluster.running(victim):
            redis_cluster.restart(victim)
        redis_cluster.wait_healthy(30.0)


def _logbin_reads(system: System, streams: list[str]) -> bool:
    """Whether the log bin has read each of ``streams`` (its consumer is in the group)."""
    try:
        return all(system.r.xinfo_consumers(s, names.LOGBIN_GROUP) for s in streams)
    except redis.ResponseError:  # a group not created yet
        return False


def _decided_ids(system: System) -> set[str]:
    entries = system.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
    return {record.request_id for record in decode_entries(entries)}


def _reply_nodes(system: System, cluster: LocalCluster) -> set[int]:
    return {owner(cluster, key.decode()) for key in system.r.scan_iter("rdv:reply:*")}


def _reply_stream_off(system: System, cluster: LocalCluster, port: int) -> None:
    """Restart the (one) gateway until its reply stream, named at random, is not on ``port``."""
    for _ in range(20):
        if _reply_nodes(system, cluster) != {port}:
            return
        system.stop("gateway")
        for key in system.r.scan_iter("rdv:reply:*"):
            system.r.delete(key)
        system.start("gateway", "gateway")
        wait_until(lambda: _reply_nodes(system, cluster), 30, "the new gateway's reply stream")
    raise AssertionError("the gateway's reply stream stayed on the deployment's node")


@pytest.mark.parametrize("lost", [0, 1], ids=["deployments-own", "another"])
def test_a_partition_whose_master_is_lost_leaves_the_others_serving(
    redis_cluster: LocalCluster,
    demo_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    lost: int,
) -> None:
    """Three partitions, one on each master; the master of one of them (not the gateway's
    reply stream's) killed under load. While its replica is elected the requests of that
    partition get a quick 503, and those of the other two are answered: the workers set the
    lost partition aside and read the others. Partition 0's master is the deployment's own
    node too (its state, revision, heartbeats and decision records): the workers then go on
    without their revision and heartbeat, which wait for the election."""
    redis_cluster.wait_healthy(30.0)
    with launch_system(redis_cluster.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
                       RDV_GATEWAY_PROCESSES="1") as system:  # fmt: skip
        store = DeploymentStore(system.r)
        store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 3), action="set-partitions",
                     actor="test")  # fmt: skip
        streams = store.get(DEMO_DEPLOYMENT).input_streams
        owners = [owner(redis_cluster, stream) for stream in streams]
        assert len(set(owners)) == 3, owners
        if lost == 0:
            _reply_stream_off(system, redis_cluster, owners[0])
        replies = _reply_nodes(system, redis_cluster)
        assert len(replies) == 1, replies
        if owners[lost] in replies:
            lost = 2
        victim = owners[lost]
        system.start_worker("real")
        system.start_worker("canary")
        time.sleep(1.2)  # the gateway's deployment cache follows within a second
        # and the log bin within its refresh (5 s)
        wait_until(lambda: _logbin_reads(system, streams), 10, "the log bin on every partition")
        try:
            with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=10,
                      prefix="lost") as load:  # fmt: skip
                promoted = promoted_when_killed(redis_cluster, victim)
                time.sleep(1.5)
                redis_cluster.kill(victim)
                killed_at = time.monotonic()
                wait_until(promoted, 15, "a replica to take the partition over")
                elected_s = time.monotonic() - killed_at
                archived_by_election = set(archived_ids(system))
                time.sleep(2.0)
            electing = [r for r in load.results
                        if killed_at + 0.1 < r["t"] < killed_at + elected_s - 0.6]  # fmt: skip
            others = [r for r in electing if names.partition_for(r["id"], 3) != lost]
            mine = [r for r in electing if names.partition_for(r["id"], 3) == lost]
            ok = load.ok_ids()
            deadline = time.monotonic() + 10
            archived, decided = set(archived_ids(system)), _decided_ids(system)
            while time.monotonic() < deadline and not ok <= archived & decided:
                time.sleep(0.2)
                archived, decided = set(archived_ids(system)), _decided_ids(system)
            figures = {**load.figures(), "elected_s": round(elected_s, 2),
                       "others_while_electing": len(others),
                       "others_answered_2xx": sum(r["status"] == 200 for r in others),
                       "lost_partition_while_electing": len(mine),
                       "2xx_missing_from_archive": len(ok - archived),
                       "2xx_without_decision_record": len(ok - decided),
                       "others_archived_while_electing": len(
                           {r["id"] for r in others} & archived_by_election)}  # fmt: skip
            report("a partition's master killed under load (cluster)", figures)
            assert {r["status"] for r in load.results} <= {200, 503, 504}, figures
            assert others or elected_s < 1.5, figures
            assert all(r["status"] == 200 for r in others), [r for r in others
                                                             if r["status"] != 200][:5]  # fmt: skip
            # quick as a rule, as in the test above: a loaded CI host (966 requests sent where
            # a quiet one sends 2,200, the election 4.2 s) once held one of 72 past a second
            slow = [r for r in mine if r["ms"] >= 1000]
            assert all(r["status"] == 503 for r in mine), [r for r in mine if r["status"] != 503]
            assert not mine or statistics.median(r["ms"] for r in mine) < 500, slow[:5]
            # The log bin archived the other partitions meanwhile, though the node that holds
            # the deployment's state (or its own counters) may have been the one lost.
            assert figures["others_archived_while_electing"] >= len(others) // 2, figures
            assert all(p.alive() for p in system.procs.values())
            assert len(ok - archived) <= max(5, len(ok) // 100), figures
            # The decision records of those seconds (on partition 0's master) were held by
            # the gateway and written once the replica was elected; as with the archive, the
            # last writes before the kill may not have reached the replica.
            assert len(ok - decided) <= max(5, len(ok) // 100), figures
        finally:
            if not redis_cluster.running(victim):
                redis_cluster.restart(victim)
            redis_cluster.wait_healthy(30.0)


def test_two_members_per_group_share_the_work_and_a_killed_one_is_taken_over(
    system: System, redis_cluster: LocalCluster
) -> None:
    """Two workers for each role and two log-bin consumers; one real worker and one log-bin
    consumer are killed with SIGKILL mid-load: every request answered once, scored once per
    role, archived once, the dead members' pending entries claimed by the live ones."""
    for role in ("real", "canary"):
        system.start_worker(role)
        system.start(f"{role}-2", "worker", "--deployment", DEMO_DEPLOYMENT, "--role", role,
                     "--consumer", f"{role}-second")  # fmt: skip
    system.start("logbin-2", "logbin", "--consumer", "logbin-second")
    wait_until(lambda: len(system.r.zrange(names.workers_key(DEMO_DEPLOYMENT), 0, -1)) >= 4,
               30, "four workers")  # fmt: skip
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=8, prefix="two") as load:
        time.sleep(2.0)
        for name in ("real-2", "logbin-2"):
            system.procs.pop(name).kill()  # SIGKILL
        time.sleep(4.0)
    ok = load.ok_ids()
    deadline = time.monotonic() + CLAIM_IDLE_MS / 1000 * 4 + 10
    archived = archived_ids(system)
    while time.monotonic() < deadline and not ok <= set(archived):
        time.sleep(0.2)
        archived = archived_ids(system)
    group = names.model_group("real")
    pending = system.r.xpending(names.input_stream(DEMO_DEPLOYMENT), group)["pending"]
    figures = {**load.figures(), "archived": len(archived), "archived_twice":
               len(archived) - len(set(archived)), "missing": len(ok - set(archived)),
               "real_pending_after": pending}  # fmt: skip
    report("two members per group, one of each killed (cluster)", figures)
    assert {r["status"] for r in load.results} <= {200}, figures
    assert ok <= set(archived), sorted(ok - set(archived))[:10]
    assert len(archived) == len(set(archived)), "a request archived twice"
    wait_until(lambda: system.r.xpending(names.input_stream(DEMO_DEPLOYMENT), group)["pending"]
               == 0, CLAIM_IDLE_MS / 1000 * 4 + 5, "the dead worker's entries claimed")  # fmt: skip


@pytest.fixture
def any_system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    env = {"RDV_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS), "RDV_DRAIN_GRACE_S": "5"}
    # Its test asks that the canary scored every request in its decision record: a second of
    # grace, where a loaded CI host once left the canary's last three 100 ms too late.
    schedule = dataclasses.replace(SCHEDULE, grace_ms=1000)
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, schedule, **env) as sys:
        yield sys


def test_partitions_spread_the_input_and_a_change_under_load_drops_nothing(
    any_system: System, bus_url: str, request: pytest.FixtureRequest
) -> None:
    """Three partitions: on the cluster one on each master; every request answered, scored by
    both roles and archived exactly once, through a change to two partitions under load."""
    system = any_system
    store = DeploymentStore(system.r)
    store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 3), action="set-partitions",
                 actor="test")  # fmt: skip
    dep = store.get(DEMO_DEPLOYMENT)
    assert len(dep.input_streams) == 3
    if "cluster" in request.node.callspec.id:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        owners = [owner(cluster, stream) for stream in dep.input_streams]
        assert sorted(owners) == sorted(cluster.masters()), owners  # one partition a master
    system.start_worker("real")
    system.start_worker("canary")
    time.sleep(1.2)  # the gateway's deployment cache follows within a second
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=7, prefix="part") as load:
        time.sleep(3.0)
        store.update(DEMO_DEPLOYMENT, lambda d: with_partitions(d, 2), action="set-partitions",
                     actor="test")  # fmt: skip
        time.sleep(3.0)
    ok = load.ok_ids()
    spread = {names.partition_for(rid, 3) for rid in ok}
    deadline = time.monotonic() + 15
    archived = archived_ids(system)
    while time.monotonic() < deadline and not ok <= set(archived):
        time.sleep(0.2)
        archived = archived_ids(system)
    records = decode_entries(system.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT)))
    by_id: dict[str, int] = {}
    for record in records:
        by_id[record.request_id] = by_id.get(record.request_id, 0) + 1
    scored_by_both = {r.request_id for r in records if {"real", "canary"} <= set(r.outputs)}
    figures = {**load.figures(), "archived": len(archived), "missing": len(ok - set(archived)),
               "archived_twice": len(archived) - len(set(archived)),
               "not_scored_by_both": len(ok - scored_by_both),
               "streams_read": len(store.get(DEMO_DEPLOYMENT).input_streams)}  # fmt: skip
    report(f"partitions 3 -> 2 under load ({request.node.callspec.id})", figures)
    assert spread == {0, 1, 2}
    refused = [(r["status"], r.get("detail")) for r in load.results if r["status"] != 200]
    assert {r["status"] for r in load.results} == {200}, (figures, refused[:3])
    assert ok <= set(archived) and len(archived) == len(set(archived)), figures
    assert all(by_id.get(rid) == 1 for rid in ok), "a decision record missing or doubled"
    assert ok <= scored_by_both, sorted(ok - scored_by_both)[:5]
    # Drained, the earlier count's streams are deleted and read no more; the others stay.
    wait_until(lambda: not store.get(DEMO_DEPLOYMENT).past_partitions, 30, "the retirement")
    after = store.get(DEMO_DEPLOYMENT)
    assert after.input_streams == names.input_streams(DEMO_DEPLOYMENT, 2)
    assert [s for s in dep.input_streams if s not in after.input_streams and system.r.exists(s)
            ] == []  # fmt: skip
    assert all(system.r.exists(s) for s in after.input_streams)
    assert store.history(DEMO_DEPLOYMENT)[-1]["action"] == "retire-partitions"
    assert len(set(archived_ids(system))) == len(archived_ids(system))
    # A caller's id stays taken across the changes for RDV_REQUEST_ID_TTL_S, its old count's
    # streams retired or not: an id sent again after a change was taken again when its
    # partition moved (44 of 60 after a change from 1 partition to 3: a helper's probe).
    again = sorted(ok)[:: max(1, len(ok) // 60)]
    moved = [rid for rid in again if names.request_id_keys(DEMO_DEPLOYMENT, rid, [3])
             != names.request_id_keys(DEMO_DEPLOYMENT, rid, [2])]  # fmt: skip
    with httpx.Client(base_url=f"http://127.0.0.1:{system.port}", timeout=10) as http:
        answers = {rid: http.post(PREDICT, json=bodies(1)[0], headers={"X-Request-Id": rid})
                   for rid in again}  # fmt: skip
        path = f"/v1/deployments/{DEMO_DEPLOYMENT}/jobs"
        jobs = [http.post(path, json=bodies(1)[0], headers={"X-Request-Id": rid}).status_code
                for rid in moved[:5]]  # fmt: skip
    assert jobs == [409] * len(jobs), jobs  # a job under a caller's id: the same rule
    assert len(moved) >= len(again) // 3, (len(moved), len(again))
    wrong = {rid: (a.status_code, a.text[:120]) for rid, a in answers.items()
             if a.status_code != 409}  # fmt: skip
    assert not wrong, (len(wrong), len(again), list(wrong.items())[:3])


def migrate_slot(cluster: LocalCluster, slot: int, source: int, target: int) -> int:
    """Move ``slot`` from master ``source`` to master ``target`` as ``redis-cli --cluster
    reshard`` does (IMPORTING/MIGRATING, MIGRATE key by key, then the new owner announced):
    while it runs, a moved key's commands get ASK, and after it MOVED. Returns keys moved."""
    ids = {n["port"]: n["id"] for n in cluster.cluster_nodes()}
    src, dst = cluster.client(source, 5.0), cluster.client(target, 5.0)
    moved = 0
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        # 100 keys a MIGRATE: the slot holds thousands (taken request ids, outcome buckets),
        # and traffic meets it half-moved for a second or so all the same.
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(0.02)  # let traffic meet the slot half-moved
        for port in (target, source):
            cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        src.close()
        dst.close()
    return moved


def test_a_slot_moved_under_load_drops_nothing(system: System, redis_cluster: LocalCluster) -> None:
    """The deployment's whole slot (its state, input, decisions, workers' keys, taken request
    ids) moves to another master under load and back: no request answered 200 is lost or
    archived twice, and all but a few answer 200 throughout (a caller's request id is taken
    and published in two steps while the slot is split: TRYAGAIN)."""
    system.start_worker("real")
    system.start_worker("canary")
    key = names.input_stream(DEMO_DEPLOYMENT)
    slot = int(system.r.keyslot(key))
    home = owner(redis_cluster, key)
    away = next(port for port in redis_cluster.masters() if port != home)
    with Load(f"http://127.0.0.1:{system.port}", bodies(), max_s=9, prefix="mv") as load:
        time.sleep(1.5)
        there = migrate_slot(redis_cluster, slot, home, away)
        # The third master learns the new owner by gossip: a client that asked it first read
        # the old owner right after the move (seen once in a loaded CI run).
        deadline = time.monotonic() + 5
        while owner(redis_cluster, key) != away and time.monotonic() < deadline:
            time.sleep(0.1)
        assert owner(redis_cluster, key) == away
        time.sleep(1.5)
        back = migrate_slot(redis_cluster, slot, away, home)
        time.sleep(1.5)
    ok = load.ok_ids()
    deadline = time.monotonic() + 15
    archived = archived_ids(system)
    while time.monotonic() < deadline and not ok <= set(archived):
        time.sleep(0.2)
        archived = archived_ids(system)
    figures = {**load.figures(), "keys_moved": [there, back], "missing": len(ok - set(archived)),
               "archived_twice": len(archived) - len(set(archived))}  # fmt: skip
    report("the deployment's slot moved under load and back (cluster)", figures)
    # A few refusals (503) or timeouts (504) while keys cross are allowed; no 500, no hang,
    # and nothing answered is lost. The slot also holds the feedback outcome store's buckets
    # (every request's outputs), whose MIGRATE blocks the slot longer than the streams' did:
    # 2.5 % refused in one loaded full-suite run, none alone.
    assert {r["status"] for r in load.results} <= {200, 503, 504}, figures
    assert load.count(200) >= 0.95 * len(load.results), figures
    assert ok <= set(archived) and len(archived) == len(set(archived)), figures
    assert all(p.alive() for p in system.procs.values())
