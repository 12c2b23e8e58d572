"""The collector settings of the long-running processes (rendezvous.heap), checked in a child
process: freezing the heap of the pytest process itself would change every later test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rendezvous.heap import YOUNG_THRESHOLD

CHECK = """
import gc
from rendezvous.heap import settle_heap
before = gc.get_freeze_count()
settle_heap()
print(before, gc.get_freeze_count() > 0, gc.get_threshold()[0], gc.isenabled())
"""


def test_settle_heap_freezes_start_up_and_widens_the_young_generation() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["0", "True", str(YOUNG_THRESHOLD), "True"]


TRIM = """
import os, random
from rendezvous.heap import trim_heap

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

random.seed(0)
burst = [os.urandom(random.randint(600, 4000)) for _ in range(40_000)]  # a burst's buffers
kept = burst[::10]  # what outlives it, scattered over the heap
del burst
before = rss_mb()
trimmed = trim_heap()
print(trimmed, round(before - rss_mb()), len(kept))
"""


def test_trim_heap_gives_a_bursts_freed_pages_back() -> None:
    """Buffers of the sizes a gateway holds per request (request and answer bytes, in glibc's
    heap), freed but for one in ten, keep the heap's pages until it is trimmed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim")
    out = subprocess.run(
        [sys.executable, "-c", TRIM], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[0] == "True", out
    assert int(out[1]) >= 30, f"only {out[1]} MB given back"
