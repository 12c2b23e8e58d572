"""The supervisor with tiny Python children instead of ``rdv`` processes: a crash is restarted
with an error logged, a clean exit (status 0) is neither restarted nor logged as a crash."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway.cli.serve import reconcile_workers, start_worker_hosts
from gateway.cli.supervisor import Supervisor
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.train import DEMO_DEPLOYMENT
from rendezvous import names
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration  # real child processes

EXIT_WITH = [sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1]))"]
"""A child that exits at once with the status given as its argument."""


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    sup = Supervisor(dict(os.environ), command=EXIT_WITH)
    yield sup
    sup.stop_all(grace_s=2)


def _poll_until(sup: Supervisor, condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        sup.poll()
        time.sleep(0.02)


def test_a_child_that_exits_0_is_dropped_not_restarted(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.cli.supervisor")
    supervisor.ensure("worker:demo:cand", ["0"], 1)
    _poll_until(supervisor, lambda: "worker:demo:cand" not in supervisor.children)
    for _ in range(5):  # later polls start nothing either
        supervisor.poll()
    assert supervisor.children == {}
    mine = [r for r in caplog.records if r.name.startswith("gateway.cli")]
    assert not [r for r in mine if r.levelno >= logging.WARNING]
    assert "exited cleanly" in caplog.text
    # Whoever still wants it (rdv serve's reconcile) can start it again.
    supervisor.ensure("worker:demo:cand", ["0"], 1)
    assert "worker:demo:cand" in supervisor.children


def test_a_crashed_child_is_restarted_with_an_error(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.cli.supervisor")
    supervisor.ensure("logbin", ["3"], 2)
    child = supervisor.children["logbin"]
    _poll_until(supervisor, lambda: child.restarts >= 1)
    assert supervisor.children["logbin"] is child
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "exited with 3" in errors[0]


def test_an_essential_child_that_exits_0_is_restarted(supervisor: Supervisor) -> None:
    """A log bin stopped with SIGTERM exits 0: it was left stopped, nothing archived or
    purged while /readyz said 200 (found by a helper's churn probe)."""
    supervisor.ensure("logbin", ["0"], 2, essential=True)
    child = supervisor.children["logbin"]
    _poll_until(supervisor, lambda: child.restarts >= 1)
    assert supervisor.children["logbin"] is child


def test_a_child_can_start_at_a_lower_cpu_priority() -> None:
    report_nice = [sys.executable, "-c", "import os, sys; sys.exit(os.nice(0))"]
    sup = Supervisor(dict(os.environ), command=report_nice)
    try:
        sup.ensure("logbin", [], 2, nice=5)
        sup.ensure("gateway", [], 0)
        procs = {name: child.proc for name, child in sup.children.items()}
        codes = {name: p.wait(timeout=30) for name, p in procs.items() if p is not None}
    finally:
        sup.stop_all(grace_s=2)
    ours = os.nice(0)
    assert codes == {"logbin": min(ours + 5, 19), "gateway": ours}


SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
"""A child that stays up (until stopped) whatever its arguments."""


def test_serve_starts_worker_hosts_or_a_process_per_role(r: redis.Redis, demo_registry) -> None:  # type: ignore[no-untyped-def]
    """The shared layout: one process for the answering roles and one, lower, for the others,
    whatever the deployments hold. The per-role layout: a process per role, the canary lower,
    retired when its role is removed."""
    store = DeploymentStore(r)
    store.create(demo_deployment(demo_registry, Schedule()))
    shared = Supervisor(dict(os.environ), command=SLEEP)
    per_role = Supervisor(dict(os.environ), command=SLEEP)
    try:
        start_worker_hosts(shared, hosts=2, shadow_nice=5)
        assert {n: (c.argv[-4:], c.nice) for n, c in shared.children.items()} == {
            f"workers:{kind}:{i}": (["--roles", kind, "--shard", f"{i}/2"], nice)
            for kind, nice in (("answering", 0), ("shadow", 5)) for i in range(2)
        }  # fmt: skip
        reconcile_workers(per_role, store, shadow_nice=5)
        assert {n: c.nice for n, c in per_role.children.items()} == {
            f"worker:{DEMO_DEPLOYMENT}:real": 0,
            f"worker:{DEMO_DEPLOYMENT}:canary": 5,
        }
        store.update(DEMO_DEPLOYMENT, lambda d: dataclasses.replace(
            d, roles={"real": d.roles["real"]}), action="test", actor="test")  # fmt: skip
        known = reconcile_workers(per_role, store, shadow_nice=5)
        assert list(per_role.children) == [f"worker:{DEMO_DEPLOYMENT}:real"]
        # A state this version cannot read keeps its workers as they were, and the scan goes
        # on to the deployments after it (it stopped there: their workers never started).
        key = names.deployment_key(DEMO_DEPLOYMENT)
        r.set(key, r.get(key).replace(b'"roles"', b'"rolez"'))  # type: ignore[union-attr]
        r.incr(names.revision_key(DEMO_DEPLOYMENT))  # as a change would: it is read again
        store.create(dataclasses.replace(demo_deployment(demo_registry, Schedule()), name="zz"))
        reconcile_workers(per_role, store, shadow_nice=5, known=known)
        assert set(per_role.children) == {
            f"worker:{DEMO_DEPLOYMENT}:real",
            "worker:zz:real",
            "worker:zz:canary",
        }
    finally:
        shared.stop_all(grace_s=2)
        per_role.stop_all(grace_s=2)


def test_a_child_killed_outright_leaves_no_live_gauge_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway process killed with SIGKILL left its live gauges in the shared metrics folder:
    ``rdv_in_flight_requests`` read 3 for good after the load ended (found by hand). Its
    counters stay, so totals never fall."""
    import signal

    from gateway.observability.metrics import merged_registry

    folder = str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", folder)
    holds = [sys.executable, "-c", (
        "import time\n"
        "from prometheus_client import Counter, Gauge\n"
        "Gauge('held', 'h', multiprocess_mode='livesum').set(3)\n"
        "Counter('served', 's').inc(7)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )]  # fmt: skip
    sup = Supervisor(dict(os.environ), command=holds)
    try:
        sup.ensure("gateway-0", [], order=0)

        def scrape() -> dict[str, float]:
            registry = merged_registry(folder)
            return {s.name: s.value for m in registry.collect() for s in m.samples}

        _poll_until(sup, lambda: scrape().get("held") == 3)
        proc = sup.children["gateway-0"].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        _poll_until(sup, lambda: proc.poll() is not None and "held" not in scrape())
        assert scrape()["served_total"] == 7
    finally:
        sup.stop_all(grace_s=2)


BEATS = [sys.executable, "-c", (
    "import sys, time\n"
    "from rendezvous.liveness import Liveness\n"
    "beats = Liveness.from_env()\n"
    "for _ in range(300):\n"
    "    if sys.argv[1] == 'steady' or (sys.argv[1] == 'hangs' and beats._next_write == 0):\n"
    "        beats.beat()\n"
    "    elif sys.argv[1] == 'behind':\n"
    "        beats.beat(time.time() - 3600)\n"
    "    time.sleep(0.1)\n"
)]  # fmt: skip
"""A child that says it makes progress every second (``steady``; ``behind``: by a clock an
hour behind the supervisor's, as after the machine's clock was stepped forward or it resumed
from sleep), once and then never again (``hangs``), or never (``starting``: loading)."""


def test_a_child_that_stops_making_progress_is_killed_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung process does not exit: the supervisor restarted only those that did, so a
    stopped or deadlocked real worker left every request to the fallback, for good. Now one
    that said it made progress and then went ``hung_after_s`` without saying so again is killed
    and restarted; one still starting (that never said so yet) is left to start."""
    caplog.set_level(logging.INFO, logger="gateway.cli.supervisor")
    sup = Supervisor(dict(os.environ), command=BEATS, hung_after_s=1.5)
    try:
        for kind in ("steady", "behind", "hangs", "starting"):
            sup.ensure(kind, [kind], 1)
        hung = sup.children["hangs"]
        first = hung.proc
        _poll_until(sup, lambda: hung.restarts >= 1)
        assert first is not None and first.returncode == -9
        for _ in range(10):  # the others, 2.5 s in, are still their first processes
            sup.poll()
            time.sleep(0.05)
        restarts = [sup.children[kind].restarts for kind in ("steady", "behind", "starting")]
        assert restarts == [0, 0, 0]
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("hangs (pid" in m and "made no progress" in m for m in said), said
        folder = os.path.dirname(hung.liveness_file)
    finally:
        sup.stop_all(grace_s=2)
    assert not os.path.exists(folder)
