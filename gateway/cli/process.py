"""What every ``rdv`` process shares: settings from arguments, the stop signal, log format."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings
from rendezvous.liveness import Liveness

if TYPE_CHECKING:
    from rendezvous.bus.consumer import ConsumerLoop

log = logging.getLogger("rdv")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def settings_from_args(args: argparse.Namespace) -> Settings:
    updates: dict[str, Any] = {}
    for key in ("host", "port", "data_dir"):
        value = getattr(args, key, None)
        if value is not None:
            updates[key] = value
    # given to the constructor, not copied in: checked as the environment's values are (an
    # empty --host listened on every address)
    return Settings(**updates)


def stop_event() -> threading.Event:
    """Set on SIGTERM or SIGINT: the process finishes its batch and exits."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("received signal %d; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_until_stopped(loop: ConsumerLoop, stop: threading.Event) -> None:
    """``loop.run(stop)`` on a thread of its own while this (the main) thread waits for the
    signal that sets ``stop`` and then interrupts the loop's blocking read: the process stops
    at once, not when the read's block runs out. What ends the loop with an error is raised
    here, as if it had run on this thread."""
    from rendezvous.bus.consumer import stop_thread  # only consumers need the bus

    failures: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(stop)
        except BaseException as exc:  # handed to the main thread
            failures.append(exc)

    thread = threading.Thread(target=run, name="rdv-consumer")
    thread.start()
    liveness = Liveness.from_env()
    while thread.is_alive():
        liveness.beat(loop.stepped_at)
        if stop.wait(0.5):
            stop_thread(loop, thread, deadline=float("inf"))
        thread.join(0.0)
    if failures:
        raise failures[0]


METRICS_FOLDER_PREFIX = "rdv-metrics-"
"""Temporary folders of the shared metrics are named ``rdv-metrics-<creator pid>-<random>``."""


def share_metrics_between_processes() -> Path:
    """prometheus-client's multi-process mode: each worker process writes its values to files
    in one folder, and ``/metrics`` sums them. The folder must be empty at start (stale files
    of an earlier run would be summed too) and set before a worker imports prometheus_client.

    Unless the operator named one (``PROMETHEUS_MULTIPROC_DIR``), the folder is a temporary
    one, removed when this process exits; one left behind by a process that was killed (its
    pid, in the name, no longer running) is removed by the next start, so restarts do not
    fill the temporary folder."""
    import atexit
    import shutil
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
        return Path(path)
    remove_orphaned_metrics_folders(Path(tempfile.gettempdir()))
    path = tempfile.mkdtemp(prefix=f"{METRICS_FOLDER_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return Path(path)


def remove_orphaned_metrics_folders(parent: Path) -> list[Path]:
    """Remove the shared-metrics folders in ``parent`` whose creator is no longer running
    (what a killed ``rdv serve`` leaves); the ones removed."""
    import shutil

    removed = []
    for folder in parent.glob(f"{METRICS_FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(METRICS_FOLDER_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)) or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread() -> None:
    """numpy's BLAS in one thread, in this process and (by the environment) its children,
    unless the operator set a thread count. Our products are a few rows by 30 features: a
    second OpenBLAS thread saves nothing, and its spin-wait after each product burned about
    50 us of the other core per call (measured: 87 against 33 us of CPU for a 100-row product
    every millisecond), on cores the gateway, workers and Redis share."""
    if any(os.environ.get(v) for v in BLAS_THREAD_VARIABLES):
        return
    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # numpy is loaded already: limit it now


FEW_OPEN_FILES = 4096
"""Below this many open files a gateway warns at start: each connection holds one."""


def open_files_to_the_hard_limit() -> int:
    """Raise this process's open-file limit (and its children's) from the soft limit to the
    hard one, as Redis and Go programs do; returns the limit now. A shell's or systemd's soft
    limit is often 1,024 beneath a hard limit of hundreds of thousands: a gateway holding
    that many connections (clients' keep-alive pools, idle ones until their timeout) had
    every new one closed unanswered by its event loop, with nothing in the log."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError):  # a system that refuses it (a cap below the hard limit)
        return soft
    return wanted


def warn_of_few_open_files(limit: int) -> None:
    """Say so at a gateway's start when connections will run out of files early."""
    if limit < FEW_OPEN_FILES:
        log.warning(
            "this process may open %d files (ulimit -n, hard limit), and each connection "
            "holds one: past about that many at once, a new connection is closed "
            "unanswered. Raise the hard limit (LimitNOFILE= under systemd, --ulimit nofile= "
            "under Docker) for more",
            limit,
        )


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The gateway's listening TCP socket. ``rdv serve`` opens one and every gateway process
    accepts on it (inherited, ``rdv gateway --fd``): the queue of connections not yet accepted
    belongs to the socket, so it outlives any one gateway, and a gateway that dies or restarts
    drops none of them. ``reuse_port``: instead, one of several processes' own sockets on one
    address (SO_REUSEPORT), for gateways started by hand."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def require_archive(settings: Settings, command: str) -> None:
    """Exit saying so when the data folder holds no archive: a read printed nothing and an
    export wrote an empty file, as for an empty archive."""
    if not settings.archive_dir.is_dir():
        sys.exit(f"{command}: no archive at {settings.archive_dir} (the log bin's folder "
                 "under --data-dir or RDV_DATA_DIR)")  # fmt: skip


def require_redis(settings: Settings) -> str:
    """``RDV_REDIS_URL``, else the embedded Redis of a ``rdv serve`` running on this data
    folder, else a clear exit."""
    if settings.redis_url:
        return settings.redis_url
    from rendezvous.bus.server import recorded_url

    url = recorded_url(settings.redis_dir)
    if url is None:
        sys.exit(
            f"no Redis: RDV_REDIS_URL is not set and no 'rdv serve' runs an embedded Redis on "
            f"the data folder {settings.data_dir} (start one with 'make serve'; for an "
            "'rdv serve' on a Redis of its own, set RDV_REDIS_URL as it has it)"
        )
    return url


def check_redis_once(url: str, settings: Settings) -> None:
    """What the system needs of Redis (``rendezvous.bus.redis_needs``), checked before a
    worker host or a log bin starts: only the gateway checked, and a worker host whose user may
    not run XADD took a batch and exited, restarted for ever; without XACK a worker and a log
    bin ran on, acking nothing (a helper's live check)."""
    from rendezvous.bus.connection import connect
    from rendezvous.bus.redis_needs import check

    client = connect(url, socket_timeout_s=settings.redis_timeout_s)
    try:
        check(client, allow_eviction=settings.allow_eviction)
    finally:
        client.close()
