"""A TLS terminator in front of a plain TCP server, for the tests: the suite's redis-server is
built without TLS, and managed Redis services speak ``rediss://``. It runs its own event loop
in a thread; each client connection gets one upstream connection, bytes piped both ways."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType


class TlsProxy:
    def __init__(self, context: ssl.SSLContext, upstream_port: int, host: str = "127.0.0.1"):
        self.context, self.upstream_port, self.host = context, upstream_port, host
        self.port = 0
        self.connections = 0
        """Client connections accepted (the test's proof that traffic went through TLS)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = started.result(10)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.context)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        """Every socket closed before the loop stops: a transport's socket is closed by a
        callback of the loop, after ``close``/``abort`` returned."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0.05)  # the transports' connection_lost callbacks run

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
