"""What a local Redis Cluster's nodes need before they start (``rendezvous.bus.local_cluster``):
the ``redis-cli`` that joins them, free loopback ports whose cluster bus ports (+10000) are
free too, and child processes that die with the test run that started them."""

from __future__ import annotations

import contextlib
import ctypes
import random
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from rendezvous.bus.server import RedisServerError, find_redis_server, free_port

BUS_PORT_OFFSET = 10000


class ClusterError(RedisServerError):
    pass


def find_redis_cli(server: str | None = None) -> str:
    """The ``redis-cli`` beside ``server`` (same version), else the one on PATH."""
    beside = Path(server or find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    path = shutil.which("redis-cli")
    if path:
        return path
    raise ClusterError(f"no redis-cli beside {beside.parent} nor on PATH")


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def cluster_ports(count: int, attempts: int = 2000) -> list[int]:
    """``count`` loopback ports that are free, as is each one's bus port (+10000), all < 65536.

    Preferably below the ephemeral range (bus port too), where the kernel never hands a port
    to an outgoing connection; else ports from :func:`free_port` below 55536."""
    chosen: list[int] = []
    low, high = 10000, _ephemeral_low() - BUS_PORT_OFFSET  # high excluded
    for _ in range(attempts):
        if len(chosen) == count:
            return chosen
        port = random.randrange(low, high) if high - low > 1000 else free_port()
        if port >= 65536 - BUS_PORT_OFFSET:
            continue
        taken = {p + d for p in chosen for d in (0, BUS_PORT_OFFSET)}
        if port in taken or port + BUS_PORT_OFFSET in taken:
            continue
        if _can_bind(port) and _can_bind(port + BUS_PORT_OFFSET):
            chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise ClusterError(f"found only {len(chosen)} of {count} free port pairs (port, port+10000)")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the process that started it dies (Linux),
    so a test run killed outright leaves no node behind. Linux means the *thread* that
    started it: start and restart nodes from a thread that outlives them (the main one)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def popen_options() -> dict[str, Any]:
    # Own session: a Ctrl-C in the terminal reaches the test run, which then stops the nodes.
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with_parent
    return options
