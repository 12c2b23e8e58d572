"""What every benchmark command shares, apart from the systems it starts: the log line on
stderr, the git commit a result is named by, and the demo rows every request carries.

A module of its own so that ``benchmarks.run``, the cost axes and the profiler take them from
a module that imports none of them (``benchmarks.run`` runs the axes)."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.systems import REPO


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def demo_rows() -> list[list[float]]:
    from models.train import demo_data

    # 7 significant digits: the float32 values of the data, written as a client would.
    return [[float(f"{v:.7g}") for v in row] for row in demo_data().x_test.tolist()]
