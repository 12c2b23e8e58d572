"""A TCP proxy in front of Redis whose open connections can be made silent for good: what
a client sees when the network between it and Redis drops its packets (no FIN, no RST, no
reply), while connections made afterwards pass (the network healed, or a failover)."""

from __future__ import annotations

import contextlib
import socket
import threading


class SilentProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.generation = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """Every connection open now forwards nothing more, and is never closed."""
        self.generation += 1

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, self.generation),
                                 daemon=True).start()  # fmt: skip

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or self.generation != generation:
                    break
                dst.sendall(data)
        except OSError:
            return
        if self.generation == generation:  # a close that passes on, as the network would
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        # silenced: the bytes are dropped and neither side hears of it
        self._closed.wait()
