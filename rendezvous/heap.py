"""Garbage-collector settings for the long-running processes (gateway, workers, log bin).

Measured at concurrency 64: with CPython's defaults the gateway's p99 latency was about 1.7x
what it was with the collector off, because full collections walk every object the process
imported (FastAPI, pydantic, numpy, onnxruntime: hundreds of thousands of them) while requests
wait. The request path itself creates almost no reference cycles, so after start-up we move
everything alive into the permanent generation (``gc.freeze``: never scanned again) and let
the young generation grow larger between collections. Cycles are still collected.

The gateway also hands the C heap's free pages back every ``TRIM_INTERVAL_S``: requests held
through a stall (an append-only rewrite's fork of Redis, under an open loop) leave the heap at
their high-water mark, freed but fragmented, and glibc returns such pages only when asked.
That is the smaller part of such a high-water mark (1-2 MB of 10-14 MB after five 1.5 s
stalls at 1,500 requests a second, `benchmarks/PROFILE.md`); the rest is Python's own arenas,
which it returns only when wholly empty.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
from collections.abc import Callable

YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (CPython's default is 700)."""
TRIM_INTERVAL_S = 30.0
"""Between two trims of a gateway's C heap: each walks the heap (about 2 ms for 50 MB, off the
event loop's thread), and a burst's pages go back within this long."""


def settle_heap() -> None:
    """Call once start-up is done: collect what start-up left, then freeze the survivors."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); False where
    there is nothing to call (not glibc) or nothing was given back."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # another C library (musl, macOS)
        return None


async def trim_heap_every(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Trim the heap every ``interval_s``, in a thread (ctypes lets go of the GIL meanwhile)."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(trim_heap)
