"""Request ids: the rule a caller's id must meet, and the ids the gateway makes up.

A request id names one request everywhere: its answer, its archive record, its decision record
and the label a caller sends for it later. Where it lands in Redis (its partition, the key that
holds it for deduplication) is ``rendezvous.names``'.
"""

from __future__ import annotations

import os
import re
import time

_HEX = frozenset("0123456789abcdef")

REQUEST_ID_PATTERN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?")
"""A caller's request id, as the ``X-Request-Id`` header and the Open Inference Protocol's
``id`` both give it: 1-128 printable ASCII characters, no space at either end. One rule for
both, so an id is the same id whichever way it came (a header cannot carry more: its ends
are trimmed, and bytes past ASCII are read as Latin-1, so ``é`` sent as a header was another
id than the same ``é`` in a body)."""


def is_request_id(value: str) -> bool:
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def new_request_id(now_ms: int | None = None) -> str:
    """A request id the gateway makes up (the caller gave none): the time in ms as 12 hex
    digits, then 80 random bits as 20, so 32 lowercase hex digits. It never repeats, and it
    says when it was made: the feedback route need not wait for the outcome of an id made
    long ago (``minted_ms``)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"{ms:012x}{os.urandom(10).hex()}"


def minted_ms(request_id: str) -> int | None:
    """When ``new_request_id`` made this id (epoch ms), or None when it cannot be one of its. A
    caller's own id of the same shape reads as a time too: who reads it must allow for that."""
    if len(request_id) != 32 or not _HEX.issuperset(request_id):
        return None
    return int(request_id[:12], 16)
