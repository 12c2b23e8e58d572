"""What every ``rdv`` process sets up before it serves: numpy's BLAS in one thread unless the
operator chose a count (checked in a fresh interpreter, where numpy is loaded first as in a
real process), and a shared-metrics folder that does not outlive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.process import (
    BLAS_THREAD_VARIABLES,
    METRICS_FOLDER_PREFIX,
    remove_orphaned_metrics_folders,
)

pytestmark = pytest.mark.pure

PROBE = """
import json, os, numpy
from gateway.cli.process import one_blas_thread
one_blas_thread()
from threadpoolctl import threadpool_info
print(json.dumps({"threads": [i["num_threads"] for i in threadpool_info()
                              if i["user_api"] == "blas"],
                  "env": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    result: dict[str, object] = json.loads(out)
    return result


def test_blas_runs_in_one_thread_here_and_in_children() -> None:
    seen = _probe()
    assert seen == {"threads": [1], "env": "1"}


def test_an_operators_thread_count_is_left_alone() -> None:
    seen = _probe(OPENBLAS_NUM_THREADS="2")
    assert seen == {"threads": [2], "env": "2"}


SHARER = """
import os, sys
from gateway.cli.process import share_metrics_between_processes
print(share_metrics_between_processes(), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
"""


def _share_metrics(tmp: Path, how: str) -> tuple[Path, int]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run([sys.executable, "-c", SHARER, how], env={**env, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return Path(done.stdout.strip()), done.returncode


def test_the_shared_metrics_folder_goes_with_its_process_even_a_killed_one(
    tmp_path: Path,
) -> None:
    """A process that made the temporary metrics folder removes it when it exits; one that
    was killed leaves it, and the next start removes it (its creator is gone)."""
    folder, code = _share_metrics(tmp_path, "exit")
    assert code == 0 and folder.parent == tmp_path and folder.name.startswith(METRICS_FOLDER_PREFIX)
    assert not folder.exists()

    killed, code = _share_metrics(tmp_path, "kill")
    assert code == -9 and killed.is_dir()
    folder, code = _share_metrics(tmp_path, "exit")
    assert code == 0 and not killed.exists() and not folder.exists()


def test_only_folders_of_processes_no_longer_running_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tmp_path / f"{METRICS_FOLDER_PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{METRICS_FOLDER_PREFIX}{os.getpid()}-abc"
    other = tmp_path / f"{METRICS_FOLDER_PREFIX}notapid"
    for folder in (orphan, live, other):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert remove_orphaned_metrics_folders(tmp_path) == [orphan]
    assert live.is_dir() and other.is_dir() and not orphan.exists()
