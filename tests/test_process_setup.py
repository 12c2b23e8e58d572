"""What every ``rdv`` process sets up before it serves: numpy's BLAS in one thread unless the
operator chose a count (checked in a fresh interpreter, where numpy is loaded first as in a
real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gateway.cli.process import BLAS_THREAD_VARIABLES

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
