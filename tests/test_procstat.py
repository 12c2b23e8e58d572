"""The benchmark's memory figures: a forked child's copy-on-write pages count once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import procstat

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="reads /proc/<pid>/smaps_rollup"
)

_FORKER = """
import os, sys, time
block = bytearray(os.urandom(48 * 1024 * 1024))  # written pages, as a Redis dataset
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def test_a_forked_child_counts_only_what_it_does_not_share_with_its_parent() -> None:
    """A process holding 48 MB of written memory forks (as Redis does for an AOF rewrite):
    the child's RSS holds the 48 MB again, but the tree's total counts them once; an
    exec'd child (every process the gateway starts) keeps its whole RSS."""
    parent = subprocess.Popen([sys.executable, "-c", _FORKER], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.2)
        mb = 1024 * 1024
        assert procstat.rss_bytes(child) > 48 * mb  # RSS counts the shared pages again
        assert procstat.resident_once_bytes(child, parent.pid) < 16 * mb
        assert procstat.resident_once_bytes(parent.pid, None) > 48 * mb

        tree = procstat.ProcessTree(parent.pid, root_name="forker")
        watch = procstat.MemoryWatch(tree)
        watch.sample()
        assert tree.parent_of == {child: parent.pid}
        total = watch.peak_total_bytes
        assert 48 * mb < total < procstat.rss_bytes(parent.pid) + 16 * mb
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_an_execd_child_keeps_its_whole_rss() -> None:
    """A child started by exec shares no written pages with its parent: nothing is taken
    off its RSS, even when it runs the same interpreter."""
    code = "import os, time; b = bytearray(os.urandom(32 * 1024 * 1024)); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        rss = procstat.rss_bytes(child.pid)
        assert rss > 32 * 1024 * 1024
        assert procstat.resident_once_bytes(child.pid, os.getpid()) > rss - 4 * 1024 * 1024
    finally:
        child.kill()
        child.wait()


def test_the_busiest_share_tells_how_evenly_a_components_processes_worked() -> None:
    """1/n when they shared the work, 1.0 when one did it all; a lone process, or a component
    that used no CPU, has no figure; a process born between the samples counts from zero."""
    names = {1: "worker", 2: "worker", 3: "gateway", 4: "gateway", 5: "redis", 6: "idle",
             7: "idle"}  # fmt: skip
    before = procstat.TreeSample({1: 1.0, 2: 1.0, 3: 5.0, 5: 0.0, 6: 2.0, 7: 2.0},
                                 names, 0.0, 0.0, 0.0)  # fmt: skip
    after = procstat.TreeSample({1: 2.0, 2: 2.0, 3: 8.0, 4: 1.0, 5: 3.0, 6: 2.0, 7: 2.0},
                                names, 0.0, 0.0, 1.0)  # fmt: skip
    assert procstat.busiest_share(before, after) == {"worker": 0.5, "gateway": 0.75}
