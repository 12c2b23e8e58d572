"""What httptools' request parser tells the HTTP guard beyond its callbacks: the method read so
far, its fault in words a client can act on, and where the whole requests of a read end (which
the parser does not say)."""

from __future__ import annotations

import contextlib
from typing import Any

import httptools


def method_of(parser: Any) -> bytes:
    """The current request's method, as far as the parser read it (before the method is read it
    says DELETE, llhttp's method 0: ask only once a request line was read, or for PRI/CONNECT)."""
    return bytes(parser.get_method())


def fault_of(parser: Any, exc: Exception, opening: bytes = b"") -> str:
    """The parser's words for what is wrong, but where they describe its own workings or miss
    the point: ``opening``, a connection's first bytes, may be a TLS handshake."""
    if opening[:1] == b"\x16" and opening[1:2] == b"\x03":  # its message: "Invalid method"
        return ("a TLS handshake; the gateway serves plain HTTP (use http://, or end TLS in a "
                "proxy in front of it)")  # fmt: skip
    if method_of(parser) == b"PRI":  # its message: "Pause on PRI/Upgrade"
        return "an HTTP/2 connection preface; the gateway serves HTTP/1.1 only"
    return str(exc)


class _Completions:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def on_message_complete(self) -> None:
        self.count += 1


def end_of_requests(data: bytes, requests: int) -> int:
    """The length of the first ``requests`` complete requests of ``data``, which begins with a
    request: the shortest prefix in which a fresh parser completes that many, bisected (a
    few parses of one read, on the rare path of a refusal behind pipelined requests)."""
    lo, hi = 0, len(data)
    while lo < hi:
        mid = (lo + hi) // 2
        seen = _Completions()
        with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
            # stops at the refused request or an upgrade: the count before it stands
            httptools.HttpRequestParser(seen).feed_data(data[:mid])
        if seen.count >= requests:
            hi = mid
        else:
            lo = mid + 1
    return lo
