"""Cost as the work grows (issue 18): four axes, each on ``rdv serve`` started for it.

    python -m benchmarks.axes [--axes challengers,rows,deployments,soak] [--duration 10]
                              [--rounds 3] [--deployments 20] [--layout shared|per-role|both]
                              [--soak-s 600 | --soak-hour]

- ``challengers``, ``rows`` (``axis_load.py``): three shadowing challengers against none at
  c64; 100-row requests against the in-process baseline. They share one ``rdv serve``.
- ``deployments`` (``axis_deployments.py``): memory, idle CPU and throughput with twenty
  deployments on one host against one.
- ``soak`` (``axis_soak.py``): memory and p99 over a long open loop at half the peak.

``make bench`` runs them too (``benchmarks.run --axes``), into its own results JSON; alone,
results go to ``benchmarks/results/axes-<date>-<commit>.json``. Every ratio key is under
``ratios``, every axis's figures under ``axes``; an axis that fails is in ``failed``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.axis_common import AxisContext, AxisOptions
from benchmarks.axis_deployments import deployments_axis
from benchmarks.axis_load import challengers_axis, rows_axis
from benchmarks.axis_soak import SOAK_HOUR_S, soak_axis
from benchmarks.harness import git, log
from benchmarks.systems import REPO

AXES: dict[str, Callable[[AxisContext], dict[str, Any]]] = {
    "challengers": challengers_axis,
    "rows": rows_axis,
    "deployments": deployments_axis,
    "soak": soak_axis,
}
LAYOUTS = ("shared", "per-role", "both")


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The axes' options, on this command line or ``benchmarks.run``'s (``prefix``: for
    options whose bare name the other command already has)."""
    p.add_argument("--axes", default=",".join(AXES),
                   help=f"of {','.join(AXES)} (default: all; 'none': no axis)")  # fmt: skip
    p.add_argument(f"--{prefix}duration", dest="axes_duration", type=float,
                   help="seconds per measured load (default 10)")  # fmt: skip
    p.add_argument(f"--{prefix}rounds", dest="axes_rounds", type=int, help="(default 3)")
    p.add_argument("--deployments", type=int, default=20, help="(default 20)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="RDV_WORKER_LAYOUT for the deployments axis (default: unset)")  # fmt: skip
    p.add_argument("--settle-s", type=float, help="before the memory figure (default 10)")
    p.add_argument("--idle-s", type=float, help="of the idle CPU figure (default 20)")
    p.add_argument("--soak-s", type=float, help="the soak's length (default 600)")
    p.add_argument("--soak-hour", action="store_true", help="a soak of an hour")
    p.add_argument("--soak-warmup-s", type=float, help="(default 60)")
    p.add_argument("--soak-sample-s", type=float, help="memory sampled every (default 5)")
    p.add_argument(
        "--soak-feedback-mb",
        type=float,
        help="RDV_FEEDBACK_MAX_MB of the soak's server (default 4; 0: the server's)",
    )
    p.add_argument("--peak-s", type=float, help="the c64 loop that finds the peak (default 5)")


def quick_defaults(args: argparse.Namespace) -> None:
    """``make bench QUICK=1``: the axes briefly too (one round, 2 s a load, a 1-minute soak)."""
    for name, value in (("axes_duration", 2.0), ("axes_rounds", 1), ("soak_s", 60.0),
                        ("soak_warmup_s", 15.0), ("settle_s", 5.0), ("idle_s", 10.0),
                        ("peak_s", 3.0)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, value)


def axis_names(text: str) -> list[str]:
    names = [a for a in text.split(",") if a and a != "none"]
    unknown = [a for a in names if a not in AXES]
    if unknown:
        raise SystemExit(f"unknown axes {unknown}; known: {', '.join(AXES)}")
    return names


def options(args: argparse.Namespace) -> AxisOptions:
    defaults = AxisOptions()
    opts = AxisOptions(
        duration_s=args.axes_duration or defaults.duration_s,
        rounds=max(1, args.axes_rounds or defaults.rounds),
        deployments=max(1, args.deployments),
        layout=args.layout,
    )
    for name in (
        "settle_s",
        "idle_s",
        "soak_s",
        "soak_warmup_s",
        "soak_sample_s",
        "peak_s",
        "soak_feedback_mb",
    ):
        if getattr(args, name) is not None:
            setattr(opts, name, getattr(args, name))
    if args.soak_hour:
        opts.soak_s = SOAK_HOUR_S
    return opts


def run_axes(names: list[str], opts: AxisOptions, work: Path, models: Path) -> dict[str, Any]:
    """Each axis in turn; ``models``: the trained demo models every ``rdv serve`` starts
    from. One axis failing leaves the others' figures (its reason in ``failed``)."""
    results: dict[str, Any] = {"axes": {}, "failed": {}}
    ctx = AxisContext(work, models, opts)
    try:
        for name in names:
            log(f"axis {name}")
            if name in ("deployments", "soak"):
                ctx.close()  # they start their own: nothing else running meanwhile
            try:
                results["axes"][name] = AXES[name](ctx)
            except Exception as exc:
                log(f"axis {name} failed: {exc}")
                # The reason first (the run's notes quote the first line), then where.
                reason = f"{type(exc).__name__}: {exc}"
                results["failed"][f"axis:{name}"] = f"{reason}\n{traceback.format_exc()[-2000:]}"
    finally:
        ctx.close()
    return results


def bench_axes(
    args: argparse.Namespace, work: Path, models: Path | None, results: dict[str, Any]
) -> None:
    """``make bench``'s axes, after its systems, into its ``results`` (``axes``, ``failed``;
    their ratio keys come with ``report.ratios``); ``models``: trained demo models, if any."""
    names = axis_names(args.axes)
    opts = options(args)
    results["config"]["axes_options"] = {"axes": names, **vars(opts)}
    results["axes"] = {}
    if not names:
        return
    work.mkdir(parents=True, exist_ok=True)
    done = run_axes(names, opts, work, models or train_models(work / "axis-models"))
    results["axes"] = done["axes"]
    results["failed"].update(done["failed"])


def train_models(work: Path) -> Path:
    from models.registry import ModelRegistry
    from models.train import train_demo

    registry = ModelRegistry(work / "models")
    train_demo(registry)
    return work / "models"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.axes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--models", type=Path, help="trained demo models (default: train them)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like an error: every rdv serve started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    names = axis_names(args.axes)
    opts = options(args)
    work = Path(tempfile.mkdtemp(prefix="rdv-axes-"))
    from benchmarks.axes_report import axis_ratios

    try:
        models = args.models if args.models is not None else train_models(work)
        results = run_axes(names, opts, work, models)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    doc = {"date": date, "commit": commit, "machine": procstat.machine(),
           "config": {"axes": names, **vars(opts)}, **results}  # fmt: skip
    doc["ratios"] = axis_ratios(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"axes-{date}-{commit}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["ratios"], indent=1))
    log(f"results in {path}")
    if results["failed"]:
        raise SystemExit(f"axes failed: {', '.join(results['failed'])}")


if __name__ == "__main__":
    main()
