"""Garbage-collector settings for the long-running processes (gateway, workers, log bin).

Measured at concurrency 64: with CPython's defaults the gateway's p99 latency was about 1.7x
what it was with the collector off, because full collections walk every object the process
imported (FastAPI, pydantic, numpy, onnxruntime: hundreds of thousands of them) while requests
wait. The request path itself creates almost no reference cycles, so after start-up we move
everything alive into the permanent generation (``gc.freeze``: never scanned again) and let
the young generation grow larger between collections. Cycles are still collected.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (CPython's default is 700)."""


def settle_heap() -> None:
    """Call once start-up is done: collect what start-up left, then freeze the survivors."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
