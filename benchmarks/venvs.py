"""The benchmark-only virtual environments, each created on first use and kept apart from the
project's own: MLServer's (a baseline, with dependencies of its own) and the tools' (matplotlib
for the plots, py-spy for the profiler). A module of its own: the MLServer baseline, the
results files and the profiler each need one, and none of them needs the others."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.systems import REPO

MLSERVER_VENV = REPO / "benchmarks" / ".venv-mlserver"
MLSERVER_REQUIREMENTS = (
    "mlserver>=1.6,<2",
    "onnxruntime>=1.18",
    "numpy>=1.26",
    # uvloop 0.22 no longer makes a loop in get_event_loop(): MLServer 1.7 workers die.
    "uvloop<0.22",
)
TOOLS_VENV = REPO / "benchmarks" / ".venv-tools"
TOOLS_REQUIREMENTS = ("matplotlib>=3.8", "py-spy>=0.3")


def ensure_venv(
    venv: Path, requirements: tuple[str, ...], log: Callable[[str], None] = print
) -> Path:
    """Create a benchmark-only virtual environment once; returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"installing {', '.join(requirements)} into {venv} (once)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *requirements], capture_output=True, text=True, check=False)
    (venv / "install.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{done.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python


def ensure_mlserver(log: Callable[[str], None] = print) -> Path:
    """The ``mlserver`` command of ``benchmarks/.venv-mlserver``, installed on first use."""
    return ensure_venv(MLSERVER_VENV, MLSERVER_REQUIREMENTS, log).with_name("mlserver")


def ensure_tools(log: Callable[[str], None] = print) -> Path:
    """The python of ``benchmarks/.venv-tools`` (matplotlib for the plot, py-spy)."""
    return ensure_venv(TOOLS_VENV, TOOLS_REQUIREMENTS, log)


def mlserver_version(venv: Path = MLSERVER_VENV) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip()
