"""A gateway's connections each hold a file: its open-file limit is how many it can hold."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from processes import rdv_env, wait_until
from rendezvous.bus.server import free_port

SOFT, HARD = 256, 2048


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_a_gateway_takes_its_hard_open_files_limit_and_says_when_that_is_low(
    r: redis.Redis, redis_url: str, demo_data_dir: Path, tmp_path: Path
) -> None:
    """Started under a soft limit of 256 beneath a hard one of 2,048 (a shell's or systemd's
    1,024 under hundreds of thousands, scaled down), a gateway holding 400 idle connections
    still answers a new one: it raised its limit to the hard one. Before, the event loop
    closed every new connection unanswered once 256 files were open, and logged nothing. A
    hard limit under 4,096 is named in its log at start."""
    (tmp_path / "models").symlink_to(demo_data_dir / "models")
    port = free_port()
    env = rdv_env(redis_url, tmp_path, port, RDV_GATEWAY_PROCESSES="1")
    log_path = tmp_path / "gateway.log"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "gateway"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=low_limit,
            start_new_session=True,
        )
    idle: list[socket.socket] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            wait_until(lambda: http.get("/healthz").status_code == 200, 30, "gateway /healthz")
            assert open_files_limits(proc.pid) == (HARD, HARD)
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
            wait_until(lambda: len(list(Path(f"/proc/{proc.pid}/fd").iterdir())) > 400, 10,
                       "the gateway to accept the idle connections")  # fmt: skip
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as fresh:
            assert fresh.get("/healthz").status_code == 200
        assert f"this process may open {HARD} files" in log_path.read_text()
    finally:
        for conn in idle:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
