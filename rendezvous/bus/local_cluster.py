"""A real Redis Cluster on loopback: three masters and three replicas, for tests and benchmarks.

Why: a gateway that runs on Redis Cluster has to be tested against one. Slot routing
(``MOVED``/``ASK``), hash tags that keep a deployment's keys on one shard, cross-slot errors and,
above all, what a client sees while a master dies and its replica is elected, are not things a
single ``redis-server`` or a mock can show. The benchmark needs the same cluster to measure the
cost of sharding. It is built from the ``redis-server`` the suite already uses
(:func:`~rendezvous.bus.server.find_redis_server`) and the ``redis-cli`` beside it, and joined
with ``redis-cli --cluster create``, the way an operator would build one.

The settings, and why:

- ``cluster-node-timeout`` 1000 ms by default (at most 2000): a dead master is marked failing
  after about this long and its replica elected some 0.5-1.5 s later, so a failover test takes
  seconds, not the ~16 s of the default 15000. Loopback has no latency spikes to mistake for
  a failure.
- ``cluster-require-full-coverage no``: while a master is down its slots fail whatever this
  says (and ``cluster-allow-reads-when-down no`` makes them fail for reads too, rather than
  serve what may be stale). With ``yes`` every *other* slot would fail for the same window
  too: one shard's loss would be a whole-cluster outage, which is neither what production
  should run nor what a failover test wants to measure. (So ``cluster_state`` stays ``ok``
  on the survivors while a master is down, as long as most masters answer: to see a
  failover, watch the slots' owner, not the state.)
- ``appendonly yes`` with ``appendfsync everysec`` and ``save ""``, as the embedded server:
  a killed node restarts with its data and its ``nodes.conf``, and rejoins as a replica of
  whoever took its slots.
- Loopback only (``bind 127.0.0.1``); ports are chosen below the kernel's ephemeral range when
  both the port and its cluster bus port (port + 10000, which must be below 65536) fit there,
  so a node restarted after a kill never finds its port taken by some outgoing connection
  (else any free ports below 55536).

Starting takes about 2 s, whatever the machine: ``redis-cli --cluster create`` sleeps 1 s after
its ``CLUSTER MEET``s, and a master keeps ``cluster_state:fail`` for 2 s after its process starts
(Redis's fixed delay before a master rejoins as writable). A failover (SIGKILL to a new master
answering) takes about 2-2.5 s at the default node timeout; a restarted node is an attached,
synchronised replica again within a second.

Every node runs in its own folder under ``root`` (``<root>/<port>/``: ``redis.conf``,
``nodes.conf``, the append-only file and ``redis.log``).
"""

from __future__ import annotations

import atexit
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from rendezvous.bus.cluster_nodes import (
    cluster_text,
    is_serving_master,
    node_problems,
    parse_cluster_nodes,
    plain_text,
)
from rendezvous.bus.cluster_ports import (
    ClusterError,
    cluster_ports,
    find_redis_cli,
    popen_options,
)
from rendezvous.bus.server import find_redis_server

MAX_NODE_TIMEOUT_MS = 2000


class LocalCluster:
    """``start()`` (or a ``with`` block), then ``url``/``urls``; ``stop()`` ends every node.

    ``kill(port)`` and ``restart(port)`` are for failover tests; ``wait_healthy()`` waits until
    the cluster is whole again (every node ``cluster_state:ok``, all slots served, every replica
    attached and in sync)."""

    def __init__(
        self,
        root: Path,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ):
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if replicas_per_master < 0:
            raise ValueError("replicas_per_master must be >= 0")
        if not 0 < node_timeout_ms <= MAX_NODE_TIMEOUT_MS:
            raise ValueError(f"node_timeout_ms must be in 1..{MAX_NODE_TIMEOUT_MS}")
        self.root = Path(root)
        self.masters_wanted = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or find_redis_server()
        self.cli = find_redis_cli(self.binary)
        self.nodes: list[int] = []
        """The nodes' ports, in the order given to ``redis-cli --cluster create``."""
        self.create_output = ""
        """What ``redis-cli --cluster create`` printed."""
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- addresses -----------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}" for port in self.nodes]

    @property
    def url(self) -> str:
        """The URL of one running node (a cluster client discovers the rest from it)."""
        for port in self.nodes:
            if self.running(port):
                return f"redis://127.0.0.1:{port}"
        raise ClusterError("no node of the cluster is running")

    def node_dir(self, port: int) -> Path:
        return self.root / str(port)

    def running(self, port: int) -> bool:
        proc = self._procs.get(port)
        return proc is not None and proc.poll() is None

    def pid(self, port: int) -> int | None:
        """The node's process id, None when it is not running."""
        proc = self._procs.get(port)
        return proc.pid if proc is not None and proc.poll() is None else None

    def client(self, port: int, timeout_s: float = 1.0) -> redis.Redis:
        """A plain (non-cluster) client on one node, for CLUSTER/INFO/WAIT; close it."""
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        if self._procs:
            raise ClusterError("the cluster is already started")
        deadline = time.monotonic() + timeout_s
        count = self.masters_wanted * (1 + self.replicas_per_master)
        self.nodes = cluster_ports(count)
        atexit.register(self.stop)
        try:
            for port in self.nodes:
                self._write_config(port)
                self._spawn(port)
            for port in self.nodes:
                self._wait_answers(port, deadline)
            self._create(deadline)
            self.wait_healthy(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self, port: int) -> None:
        d = self.node_dir(port)
        d.mkdir(parents=True, exist_ok=True)
        (d / "redis.conf").write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f'dir "{d.resolve()}"',
                    'logfile "redis.log"',
                    "daemonize no",
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-node-timeout {self.node_timeout_ms}",
                    "cluster-require-full-coverage no",
                    "cluster-allow-reads-when-down no",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            )
        )

    def _spawn(self, port: int) -> None:
        self._procs[port] = subprocess.Popen(
            [self.binary, str(self.node_dir(port) / "redis.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            **popen_options(),
        )

    def _log_tail(self, port: int, lines: int = 15) -> str:
        try:
            text = (self.node_dir(port) / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no redis.log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_answers(self, port: int, deadline: float) -> None:
        """Until the node answers PING (not while it loads its append-only file)."""
        client = self.client(port)
        try:
            while True:
                proc = self._procs[port]
                if proc.poll() is not None:
                    raise ClusterError(
                        f"redis-server on port {port} exited with {proc.returncode}; "
                        f"end of {self.node_dir(port) / 'redis.log'}:\n{self._log_tail(port)}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"redis-server on port {port} did not answer in time")
                time.sleep(0.01)
        finally:
            client.close()

    def _create(self, deadline: float) -> None:
        args = [
            self.cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in self.nodes),
            "--cluster-replicas",
            str(self.replicas_per_master),
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired as exc:
            self.create_output = plain_text(exc.stdout) + plain_text(exc.stderr)
            out = self.create_output
            printed = f"it printed:\n{out}" if out else "it printed nothing"
            raise ClusterError(
                f"redis-cli --cluster create did not finish in time ({' '.join(args[3:])}); "
                f"{printed}"
            ) from exc
        self.create_output = plain_text(done.stdout) + plain_text(done.stderr)
        if done.returncode != 0:
            raise ClusterError(
                f"redis-cli --cluster create failed ({done.returncode}):\n{self.create_output}"
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node (each fsyncs its append-only file), SIGKILL what outlives
        ``timeout_s``."""
        atexit.unregister(self.stop)
        procs, self._procs = self._procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self, port: int) -> None:
        """SIGKILL one node, for failover tests; ``restart(port)`` brings it back."""
        proc = self._procs.get(port)
        if proc is None:
            raise ClusterError(f"no node of this cluster on port {port}")
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self, port: int, timeout_s: float = 10.0) -> None:
        """Start a killed node again with its own folder and ``nodes.conf``: it loads its data,
        learns its slots were taken over and rejoins as a replica. Returns once it answers;
        ``wait_healthy()`` waits for it to be attached and in sync."""
        if port not in self._procs:
            raise ClusterError(f"no node of this cluster on port {port}")
        if self.running(port):
            raise ClusterError(f"the node on port {port} is running")
        self._spawn(port)
        self._wait_answers(port, time.monotonic() + timeout_s)

    # -- state ---------------------------------------------------------------------------

    def cluster_nodes(self, port: int | None = None) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as seen by one node (any running one by default), one dict per
        node: id, port, bus_port, flags (a set, without "myself"), myself, master (its id, or
        None), link, slots (the ranges)."""
        port = port if port is not None else _port(self.url)
        client = self.client(port)
        try:
            text = cluster_text(client, "NODES")
        finally:
            client.close()
        return parse_cluster_nodes(text)

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots now."""
        return sorted(n["port"] for n in self.cluster_nodes() if is_serving_master(n))

    def replicas(self) -> list[int]:
        return sorted(n["port"] for n in self.cluster_nodes() if "slave" in n["flags"])

    def problems(self) -> list[str]:
        """Why the cluster is not whole (empty when it is), as each node sees it."""
        found: list[str] = []
        replicas = self.masters_wanted * self.replicas_per_master
        for port in self.nodes:
            if not self.running(port):
                found.append(f"{port}: not running")
                continue
            client = self.client(port)
            try:
                found += node_problems(client, port, self.masters_wanted, replicas)
            finally:
                client.close()
        return found

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until :meth:`problems` is empty, else :class:`ClusterError` saying what is not."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.problems()
            if not found:
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster is not healthy after {timeout_s:.1f}s: "
                    + "; ".join(found[:12])
                    + (f"\nredis-cli --cluster create printed:\n{self.create_output}")
                )
            time.sleep(0.05)

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 10.0) -> float:
        """Poll ``check`` (errors count as False) until true; the seconds it took."""
        start = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - start
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() - start > timeout_s:
                raise ClusterError(f"still not so after {timeout_s:.1f}s")
            time.sleep(0.02)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])
