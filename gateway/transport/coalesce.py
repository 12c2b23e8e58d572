"""One socket write per response, not two.

uvicorn's httptools protocol writes a response's status line and headers in one
``transport.write`` and its body in another, and uvloop sends each at once: two ``send``
system calls and two TCP segments for every answer, on the loopback about as costly as the
rest of the HTTP layer, and the client wakes twice. ``CoalescingTransport`` keeps what is
written during one turn of the event loop and hands it to the real transport in one write at
the start of the next turn (``call_soon``): the header and body of a response (and of several
pipelined ones) leave together. Closing, half-closing and reading go through at once, after
what is kept; aborting drops it, as the real transport drops its buffer. Past
``FLUSH_BYTES`` kept, a write goes on at once: a large body streamed without a pause still
meets the real transport's flow control (``pause_writing``) as it did.

Only the ``asyncio.Transport`` methods are used, on both sides.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_BYTES = 64 * 1024
"""Kept bytes that are handed on at once, without waiting for the next turn."""


class CoalescingTransport(asyncio.Transport):
    __slots__ = ("_kept", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes | bytearray | memoryview] = []
        self._kept = 0

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._kept += len(data)
        if self._kept >= FLUSH_BYTES:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is kept to the real transport, as one write."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._kept = 0
        if self._transport.is_closing():
            return  # the real transport would drop it too (and warn)
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._kept

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._kept = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # -- reading and the rest -----------------------------------------------------------------

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
