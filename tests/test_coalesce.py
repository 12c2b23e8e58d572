"""The coalescing transport: what one turn of the event loop writes leaves as one write, in
order; closing and half-closing send what is kept first; aborting drops it.
(tests/test_http_protocol.py serves keep-alive, pipelined and refused requests through it
against a real gateway.)"""

from __future__ import annotations

import asyncio

from gateway.transport.coalesce import FLUSH_BYTES, CoalescingTransport


class Recorder(asyncio.Transport):
    """The real transport's side: every write it is handed, and what happened after."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 10

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def next_turn() -> None:
    await asyncio.sleep(0)


async def test_a_turns_writes_leave_as_one_in_order() -> None:
    real = Recorder()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    head, body, second = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
        b"{}",
        b"HTTP/1.1 204\r\n\r\n",
    )
    transport.write(head)
    transport.write(b"")  # nothing to send: no write
    transport.writelines([body, second])
    kept = len(head) + len(body) + len(second)
    assert real.writes == [] and transport.get_write_buffer_size() == 10 + kept
    await next_turn()
    assert real.writes == [head + body + second]
    transport.write(b"next")
    await next_turn()
    assert real.writes[1:] == [b"next"]  # a later turn: a write of its own
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_closing_and_half_closing_send_what_is_kept_first() -> None:
    real = Recorder()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"answer")
    transport.write_eof()
    assert real.events == ["write", "eof"] and real.writes == [b"answer"]
    transport.write(b"bye")
    transport.close()
    assert real.events == ["write", "eof", "write", "close"]
    await next_turn()  # the flush already scheduled finds nothing more to send
    assert real.writes == [b"answer", b"bye"] and transport.is_closing()
    transport.write(b"too late")
    await next_turn()
    assert real.writes == [b"answer", b"bye"]  # the real transport is closing: dropped


async def test_abort_drops_what_is_kept() -> None:
    real = Recorder()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await next_turn()
    assert real.events == ["abort"] and real.writes == []


async def test_a_large_body_goes_on_at_once_to_meet_flow_control() -> None:
    """Past FLUSH_BYTES kept, the real transport gets the bytes in the same turn (where its
    buffer limits pause the writer), not one turn later."""
    real = Recorder()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"x" * (FLUSH_BYTES - 100))
    assert real.writes == []
    transport.write(b"y" * 200)
    assert [len(w) for w in real.writes] == [19 + FLUSH_BYTES - 100 + 200]
    assert transport.get_write_buffer_size() == 10
    transport.write(b"tail")
    await next_turn()
    assert real.writes[-1] == b"tail" and len(real.writes) == 2
