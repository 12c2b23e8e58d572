"""The collector settings of the long-running processes (rendezvous.heap), checked in a child
process: freezing the heap of the pytest process itself would change every later test."""

from __future__ import annotations

import subprocess
import sys

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
