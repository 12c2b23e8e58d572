"""``rdv serve`` on a fresh data folder: embedded Redis, demo training, every process, a clean
stop; and the supervisor restarts a worker that dies."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.transport.guarded_protocol import SHARED_PORT_REQUESTS_PER_CONNECTION
from models.archive import ArchiveReader
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import RdvProcess, alive, wait_until
from rendezvous.bus.server import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration  # real processes and an embedded Redis of its own


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of ``pid``, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(entry.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _label(cmd: str) -> str:
    """``rdv`` child command line -> the kind of roles it hosts if a worker, else its
    subcommand."""
    args = cmd.split(" -m gateway.cli.main ", 1)[-1].split()
    return args[args.index("--roles") + 1] if "--roles" in args else args[0]


def _nice(pid: int) -> int:
    """The niceness of a process, from /proc (field 19 of its stat line)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find child processes")
def test_serve_starts_everything_answers_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    redis_port = free_port()  # an operator held to a range of ports sets it
    env.update({"RDV_PORT": str(port), "RDV_WORKER_BLOCK_MS": "200",
                "RDV_GATEWAY_PROCESSES": "2", "RDV_WATCHDOG_S": "10",
                "RDV_MODEL_RUN_LIMIT_S": "0.5",
                "RDV_EMBEDDED_REDIS_PORT": str(redis_port)})  # fmt: skip
    data = tmp_path / "data"
    cli_env = {**env, "RDV_DATA_DIR": str(data)}  # no RDV_REDIS_URL: env has none
    serve = RdvProcess(["serve", "--data-dir", str(data)], env, tmp_path / "serve.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve to be ready")
        assert (data / "models" / "breast-cancer" / "2" / "model.onnx").exists()
        assert (data / "redis" / "appendonlydir").exists() or any((data / "redis").glob("*.aof"))
        # Every process reaches the embedded Redis on its Unix socket (cheaper than loopback TCP),
        # and the address recorded for the CLI names it.
        recorded = (data / "redis" / "address").read_text().strip()
        assert recorded.startswith("unix://") and (data / "redis" / "redis.sock").is_socket()
        clients = redis.Redis.from_url(recorded).client_list()
        on_port = redis.Redis(port=redis_port).info("server")["process_id"]
        assert on_port == redis.Redis.from_url(recorded).info("server")["process_id"]
        assert len([c for c in clients if c["addr"].startswith("/")]) >= 4  # gateways, workers

        x = demo_data().x_test[0]
        body = {"features": dict(zip(demo_data().names, map(float, x), strict=True))}
        resp = http.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
        assert resp.status_code == 200, resp.text
        # real answers (the first request may meet a real still cold on a loaded machine, past
        # its deadline: the canary's fallback answer is right too; a CI run saw one)
        wait_until(lambda: http.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
                   .json()["model"]["role"] == "real", 10, "real to answer")  # fmt: skip
        # Two gateway processes share the port: a keep-alive connection's 100th answer closes
        # it (RDV_REQUESTS_PER_CONNECTION unset), so that a client with few connections does
        # not stay on whichever process took them first. The client reconnects by itself.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as one:
            answers = [one.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
                       for _ in range(SHARED_PORT_REQUESTS_PER_CONNECTION + 1)]  # fmt: skip
        assert all(r.status_code == 200 for r in answers)
        closing = [k for k, r in enumerate(answers, 1) if r.headers.get("connection") == "close"]
        assert closing == [SHARED_PORT_REQUESTS_PER_CONNECTION], closing

        children = _children(serve.proc.pid)
        names = " ".join(cmd for _pid, cmd in children)
        assert "redis-server" in names and "gateway" in names and "logbin" in names
        # Two worker processes host the models: real in one, the canary (off the critical
        # path) in the other, which runs at a lower CPU priority like the log bin.
        real = [pid for pid, cmd in children if "--roles answering" in cmd]
        assert len(real) == 1
        assert len([cmd for _pid, cmd in children if " worker " in cmd]) == 2
        nice = {_label(cmd): _nice(pid) for pid, cmd in children if "gateway.cli.main" in cmd}
        base = _nice(serve.proc.pid)
        assert nice == {"gateway": base, "answering": base, "shadow": base + 5,
                        "logbin": base + 5}  # fmt: skip
        # Two gateways accept on serve's one socket; one that dies leaves the other serving
        # (no connection made meanwhile is refused or reset), and comes back.
        gateways = [pid for pid, cmd in children if "gateway --fd" in cmd]
        assert len(gateways) == 2
        os.kill(gateways[0], signal.SIGKILL)
        for _ in range(20):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
                r = fresh.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
                assert r.is_success, r.text
        wait_until(
            lambda: len([p for p, c in _children(serve.proc.pid)
                         if "gateway --fd" in c and p != gateways[0]]) == 2,
            20, "the supervisor to restart the gateway",
        )  # fmt: skip
        http.close()
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        os.kill(real[0], signal.SIGKILL)
        wait_until(
            lambda: any("--roles answering" in c and p != real[0]
                        for p, c in _children(serve.proc.pid)),
            20, "the supervisor to restart the host of the real model",
        )  # fmt: skip

        # The restarted worker answers again as real.
        def answered_by_real() -> bool:
            r = http.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
            return r.status_code == 200 and r.json()["model"]["role"] == "real"

        wait_until(answered_by_real, 30, "real to answer again", interval_s=0.2)
        assert "restarting" in serve.log_text()
        _hung_processes_are_restarted(serve, port, body)

        _redis_crash_under_load(serve, port, body, data)

        # The CLI beside serve finds its embedded Redis by itself (the README's first commands).
        decisions = _rdv(["decisions", "--deployment", DEMO_DEPLOYMENT, "--limit", "2"], cli_env)
        assert decisions.returncode == 0, decisions.stderr
        assert decisions.stdout.count('"request_id"') == 2
    finally:
        http.close()
        pids = [pid for pid, _ in _children(serve.proc.pid)]
        code = serve.stop(timeout_s=30)
    assert code == 0, serve.log_text()[-3000:]
    gone = _rdv(["decisions", "--deployment", DEMO_DEPLOYMENT], cli_env)
    assert gone.returncode != 0 and "no 'rdv serve' runs an embedded Redis" in gone.stderr
    time.sleep(0.2)
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ), f"child {pid} outlived serve"


def _hung_processes_are_restarted(serve: RdvProcess, port: int, body: dict[str, Any]) -> None:
    """A process that hangs does not exit: stopped (SIGSTOP), the host of the real model and a
    gateway process went on holding their roles, the canary answering every request after
    real's deadline, until a person came. Now, once they have made no progress for
    RDV_WATCHDOG_S (10 s here), they are killed and restarted, and real answers again."""
    children = _children(serve.proc.pid)
    (host,) = [p for p, c in children if "--roles answering" in c]
    gateway = next(p for p, c in children if "gateway --fd" in c)
    os.kill(host, signal.SIGSTOP)
    os.kill(gateway, signal.SIGSTOP)

    def replaced() -> bool:
        now = [p for p, _ in _children(serve.proc.pid)]
        return host not in now and gateway not in now

    wait_until(replaced, 30, "the supervisor to kill the stopped processes", interval_s=0.2)

    def answered_by_real() -> bool:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as fresh:
            r = fresh.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body)
        return r.status_code == 200 and r.json()["model"]["role"] == "real"

    wait_until(answered_by_real, 30, "real to answer after the restart", interval_s=0.2)
    log = serve.log_text()
    assert log.count("made no progress") == 2, log[-3000:]


def _rdv(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _redis_crash_under_load(serve: RdvProcess, port: int, body: dict[str, Any], data: Path) -> None:
    """kill -9 of the embedded Redis under load: serve restarts it and predicts answer 200
    again within 10 s of the crash; the figures are printed (a crash of Redis may lose up to
    its last second of writes, ``appendfsync everysec``)."""
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            i = 0
            while not stop.is_set():
                rid = f"crash-{i}"
                i += 1
                try:
                    r = client.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body,
                                    headers={"X-Request-Id": rid})  # fmt: skip
                    answers.append((time.monotonic(), r.status_code, rid))
                except httpx.HTTPError:
                    answers.append((time.monotonic(), 0, rid))
                time.sleep(0.005)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        (redis_pid,) = [p for p, c in _children(serve.proc.pid) if "redis-server" in c]
        os.kill(redis_pid, signal.SIGKILL)
        crashed = time.monotonic()
        wait_until(
            lambda: any(t > crashed and s == 200 for t, s, _ in answers[-50:]), 15,
            "predicts to answer 200 after the Redis crash", interval_s=0.1,
        )  # fmt: skip
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(10)
    recovered = min(t for t, s, _ in answers if t > crashed and s == 200)
    ok = {rid for _, s, rid in answers if s == 200}
    statuses = Counter(s for _, s, _ in answers)

    def missing() -> set[str]:
        archived = {
            r["request_id"] for r in ArchiveReader(data / "logbin").records(DEMO_DEPLOYMENT)
        }
        return ok - archived

    with contextlib.suppress(AssertionError):  # what never reaches the archive stays missing
        wait_until(lambda: not missing(), 20, "the log bin to archive what was answered")
    print(f"\n[redis crash] sent {len(answers)}, 2xx {statuses[200]}, 503 {statuses[503]}, "
          f"other {len(answers) - statuses[200] - statuses[503]}, answered again after "
          f"{recovered - crashed:.1f} s, lost from the archive {len(missing())}")  # fmt: skip
    assert recovered - crashed <= 10
    assert "embedded Redis restarted" in serve.log_text()
    assert set(statuses) <= {200, 503}, statuses


def test_serve_on_a_taken_port_says_so_and_starts_nothing(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    env["RDV_PORT"] = str(port)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "serve", "--data-dir", str(tmp_path / "d")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "d" / "redis").exists()


def test_an_embedded_redis_port_another_server_holds_is_said_not_taken_for_ours(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """``RDV_EMBEDDED_REDIS_PORT`` on a port another Redis holds: ours exits on it, but the
    other answered the start's ping first, and the start took it for ours (a set port makes
    that likely; a port chosen at random, seldom). Now ours must be the server whose process
    answers, and serve says why it stops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    env.update({"RDV_PORT": str(free_port()), "RDV_EMBEDDED_REDIS_PORT": str(redis_server.port)})
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--data-dir", str(tmp_path / "d")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "the embedded Redis did not start" in done.stderr, done.stderr[-2000:]
    assert "Address already in use" in done.stderr, done.stderr[-2000:]
    assert redis_server.running


def test_serve_refuses_to_wait_for_replicas_the_embedded_redis_has_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every predict was a 503 waiting for a replica that could never be, while /readyz said
    200 (found by a helper's probe of every setting)."""
    from gateway.cli.main import main

    monkeypatch.delenv("RDV_REDIS_URL", raising=False)
    monkeypatch.setenv("RDV_WAIT_REPLICAS", "1")
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--data-dir", str(tmp_path / "d"), "--port", "1"])
    assert refused.value.code == 2  # settings that do not fit together, as the table says
    assert "RDV_WAIT_REPLICAS=1 needs a Redis with replicas" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing started


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find child processes")
def test_one_serve_a_data_folder_and_a_killed_serve_leaves_no_redis_behind(
    tmp_path: Path, demo_data_dir: Path
) -> None:
    """A second ``rdv serve`` on a data folder in use says so and starts nothing; one killed
    outright takes its Redis with it (found left running by hand: the next serve started a
    second Redis on the same append-only file), and the next serve starts on that folder."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(demo_data_dir / "models", data / "models")  # no training here
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    env.update({"RDV_GATEWAY_PROCESSES": "1", "RDV_WORKER_BLOCK_MS": "200"})
    port = free_port()
    serve = RdvProcess(["serve", "--data-dir", str(data)], {**env, "RDV_PORT": str(port)},
                       tmp_path / "serve.log")  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve to be ready")
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "serve", "--data-dir", str(data)],
            env={**env, "RDV_PORT": str(free_port())}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert second.returncode != 0 and "another rdv serve is running" in second.stderr
        recorded = (data / "redis" / "address").read_text().strip()
        redis_pid = int(redis.Redis.from_url(recorded).info("server")["process_id"])
        children = [pid for pid, _cmd in _children(serve.proc.pid)]
        assert redis_pid in children
        serve.kill()  # SIGKILL: no clean stop
        wait_until(lambda: not any(alive(p) for p in children), 15, "every child to go")
    finally:
        serve.stop()
    again = RdvProcess(["serve", "--data-dir", str(data)], {**env, "RDV_PORT": str(port)},
                       tmp_path / "again.log")  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 60, "serve again")
            x = demo_data().x_test[0]
            body = {"features": dict(zip(demo_data().names, map(float, x), strict=True))}
            assert http.post(f"/v1/deployments/{DEMO_DEPLOYMENT}/predict", json=body).is_success
    finally:
        assert again.stop() == 0


def test_a_redis_left_on_a_data_folder_is_shut_down_before_a_new_one(tmp_path: Path) -> None:
    """Should a Redis outlive its serve all the same, the next serve stops it first."""
    from rendezvous.bus.server import EmbeddedRedis, stop_left_over

    left = EmbeddedRedis(tmp_path / "redis").start()
    left.record_address()
    try:
        redis.Redis.from_url(left.url).set("kept", "yes")
        assert stop_left_over(tmp_path / "redis") == left.url
        wait_until(lambda: not left.running, 10, "the left Redis to exit")
        assert stop_left_over(tmp_path / "redis") is None
        again = EmbeddedRedis(tmp_path / "redis").start()
        try:
            assert redis.Redis.from_url(again.url).get("kept") == b"yes"  # its file was whole
        finally:
            again.stop()
    finally:
        left.stop()


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find child processes")
def test_a_gateway_of_several_processes_killed_outright_leaves_none_serving(
    redis_url: str, tmp_path: Path
) -> None:
    """``rdv gateway`` hands its processes to uvicorn's supervisor; killed outright, that left
    them serving on the port, and the next ``rdv gateway`` could not bind it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDV_")}
    env.update({"RDV_REDIS_URL": redis_url, "RDV_PORT": str(port),
                "RDV_GATEWAY_PROCESSES": "2", "RDV_DATA_DIR": str(tmp_path / "data")})  # fmt: skip
    first = RdvProcess(["gateway"], env, tmp_path / "first.log")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, 60, "the gateway")
        workers = [pid for pid, cmd in _children(first.proc.pid) if "spawn_main" in cmd]
        assert len(workers) == 2, _children(first.proc.pid)
        first.kill()
        wait_until(lambda: not any(alive(p) for p in workers), 15, "its processes to go")
    finally:
        first.stop()
    again = RdvProcess(["gateway"], env, tmp_path / "again.log")
    try:
        wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, 60, "a new gateway")
        assert again.alive()
    finally:
        assert again.stop() == 0
