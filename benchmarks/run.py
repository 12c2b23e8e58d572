"""``make bench``: the full rendezvous path against two baselines, on one machine, in one run.

Starts ``rdv serve`` on a fresh data folder (embedded Redis, gateway, real and canary workers,
log bin), then the same on a local Redis Cluster (three masters, like the single node without
replicas; then again with a replica each, what replication costs on the same cores), then the
in-process FastAPI baseline, then MLServer, one system at a time, and drives each with the
same load generator: a warm-up, closed loops at each concurrency, an open loop at a fixed
rate; the Redis commands and bytes of each load are counted on every master. Writes
``<out>/<date>-<commit>.json`` (every figure), ``.md`` (the table) and ``.png`` (latency
against throughput), and prints the table.

    python -m benchmarks.run [--quick] [--duration S] [--concurrency 1,8,64] [--rate R]
                             [--overload CONNECTIONS]

Then issue 18's cost axes (``benchmarks/axes.py``: challengers, rows, deployments, soak; about
16 minutes with the 10-minute soak), each on an ``rdv serve`` of its own, into the same results
(``axes``, and their keys in ``ratios``); ``--axes none`` skips them, ``--axes soak`` runs one.

``--overload`` adds, in every round, a gateway at a small in-flight bound driven by many more
connections than it may hold: how long its 429s and its 200s take (``overload_phase``).

One module for the run's whole order (options, rounds over the systems, the files written):
it reads best in one place. The parts it calls: measure_system (one system, every load; a
load is load_phase's), calibration, overload, results_files and axes, and below them loadgen,
systems, baselines, procstat, redisstat and report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import axes, procstat
from benchmarks.baselines import start_inprocess, start_mlserver
from benchmarks.calibration import calibrate
from benchmarks.harness import demo_rows, git, log
from benchmarks.measure_system import measure
from benchmarks.overload import combine_overload, overload_phase
from benchmarks.report import combine_rounds, ratios
from benchmarks.report_markdown import markdown
from benchmarks.results_files import README_END, README_START, update_readme, write
from benchmarks.systems import REPO, Running, start_rdv, start_rdv_cluster

SYSTEMS = ("gateway", "gateway-cluster", "gateway-cluster-replicated", "inprocess", "mlserver")
RDV_SYSTEMS = ("gateway", "gateway-cluster", "gateway-cluster-replicated")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 s per load, concurrency 1 and 64, the open loop at 200 req/s",
    )
    p.add_argument("--duration", type=float, help="seconds per measured load (default 10)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per system (default 3)")
    p.add_argument("--concurrency", help="closed-loop concurrencies (default 1,8,64)")
    p.add_argument("--rate", type=float, help="open-loop requests/s (default 400; 0: none)")
    p.add_argument("--loadgen-procs", type=int, default=2, help="load processes (default 2)")
    p.add_argument("--rounds", type=int, help="rounds over every system in turn; each load's "
                   "figures are its median round's (default 3, quick 1)")  # fmt: skip
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which of " + ",".join(SYSTEMS))
    p.add_argument("--gateway-processes", type=int, help="RDV_GATEWAY_PROCESSES (default: rdv's)")
    p.add_argument(
        "--cluster-partitions",
        type=int,
        default=1,
        help="input partitions of the demo deployment on the cluster (default 1)",
    )
    p.add_argument(
        "--cluster-replicas",
        type=int,
        default=1,
        help="replicas per master of gateway-cluster-replicated (default 1); gateway-cluster "
        "has none, as the single node",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="RDV_NAME=VALUE",
        type=rdv_setting,
        help="a setting for rdv serve (repeatable; A/B runs)",
    )
    p.add_argument(
        "--overload",
        type=int,
        default=0,
        metavar="CONNECTIONS",
        help="per round, a gateway with RDV_MAX_IN_FLIGHT=--overload-max-in-flight under a "
        "closed loop of this many connections: 429 and 200 latencies (default 0: not run)",
    )
    p.add_argument("--overload-max-in-flight", type=int, default=64, help="(default 64)")
    p.add_argument("--overload-duration", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--inprocess-processes", type=int, default=2)
    p.add_argument(
        "--model",
        type=Path,
        help="ONNX model for the baselines when the gateway "
        "is not run (default: trained into the run's data folder)",
    )
    p.add_argument(
        "--rdv-models",
        type=Path,
        help="a trained demo models folder for rdv serve to start with (default: it trains "
        "them at its first start)",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib install)")
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the run's temp folder (data, logs, archives); kept anyway when a system failed",
    )
    p.add_argument(
        "--no-calibrate", action="store_true", help="skip the load generator's ceiling check"
    )
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="run nothing: redo the .md/.png of a result"
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help=f"put the table in README.md between {README_START} and {README_END}",
    )
    axes.add_arguments(p, prefix="axes-")
    args = p.parse_args(argv)
    if args.quick:
        axes.quick_defaults(args)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("1,64" if args.quick else "1,8,64")).split(",")
    ]
    args.rate = args.rate if args.rate is not None else (200.0 if args.quick else 400.0)
    args.rounds = max(1, args.rounds or (1 if args.quick else 3))
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}")
    return args


def rdv_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("RDV_"):
        raise argparse.ArgumentTypeError(f"expected RDV_NAME=VALUE, got {text!r}")
    return name, value


def _expected_labels(model: Path, rows: list[list[float]]) -> list[int]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels, _ = session.run(None, {session.get_inputs()[0].name: np.asarray(rows, np.float32)})
    return [int(v) for v in labels]


def _rdv_data(work: Path, name: str, round_no: int) -> Path:
    return work / (f"rdv-data-{round_no}" if name == "gateway" else f"{name}-data-{round_no}")


def _trained_models(work: Path, given: Path | None = None) -> Path | None:
    """``--rdv-models``, else the demo models the first ``rdv serve`` of the run trained."""
    if given is not None:
        return given
    for name in RDV_SYSTEMS:
        models = _rdv_data(work, name, 1) / "models"
        if (models / "breast-cancer" / "2" / "model.onnx").is_file():
            return models
    return None


def _start(
    name: str, args: argparse.Namespace, work: Path, model: Path | None, round_no: int
) -> Running:
    if name in RDV_SYSTEMS:
        # A fresh data folder (and Redis) each round, with the first trained models.
        data = _rdv_data(work, name, round_no)
        trained = _trained_models(work, args.rdv_models)
        if trained is not None and not (data / "models").exists():
            shutil.copytree(trained, data / "models")
        if name == "gateway":
            return start_rdv(data, work, args.gateway_processes, settings=dict(args.set))
        return start_rdv_cluster(
            data,
            work / f"{name}-{round_no}",
            work,
            args.gateway_processes,
            settings=dict(args.set),
            partitions=args.cluster_partitions,
            replicas=args.cluster_replicas if name == "gateway-cluster-replicated" else 0,
            name=name,
        )
    assert model is not None
    if name == "inprocess":
        return start_inprocess(model, work, args.inprocess_processes)
    return start_mlserver(model, work / "mlserver", work, log=log)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rdv-bench-"))
    log(f"work folder {work}")
    rows = demo_rows()
    model: Path | None = args.model
    machine = procstat.machine()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "request": "one breast-cancer test row per request (models/train.py demo_data), "
        f"{len(rows)} rows in turn",
        "systems": {},
        "failed": {},
        "notes": [],
    }
    if not args.no_calibrate:
        results["loadgen_calibration"] = calibrate(args, work, rows)
    # Rounds take the systems in turn, so that a slow spell of a shared machine falls on
    # every system rather than on whichever happened to be measured then.
    runs: dict[str, list[dict[str, Any]]] = {}
    overloads: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        if args.rounds > 1:
            log(f"round {round_no} of {args.rounds}")
        # Every other round in the reverse order: no system always follows the same one.
        order = args.systems if round_no % 2 else args.systems[::-1]
        for name in order:
            if name in results["failed"]:
                continue
            if name not in RDV_SYSTEMS and model is None:
                trained = _trained_models(work, args.rdv_models)
                model = trained / "breast-cancer" / "2" / "model.onnx" if trained else _train(work)
            t0 = time.monotonic()
            log(f"starting {name}")
            try:
                running = _start(name, args, work, model, round_no)
            except Exception as exc:  # a baseline that cannot start must not sink the run
                log(f"{name} did not start: {exc}")
                results["failed"][name] = str(exc)[-2000:]
                continue
            if name in RDV_SYSTEMS and model is None:
                trained = _trained_models(work, args.rdv_models)
                model = trained / "breast-cancer" / "2" / "model.onnx" if trained else None
            try:
                expected = _expected_labels(model, rows[:8]) if model else []
                figures = measure(running, args, rows, expected, time.monotonic() - t0)
                runs.setdefault(name, []).append(figures)
            finally:
                code = running.stop()
                log(f"stopped {name} (exit {code})")
                time.sleep(1.0)
        if args.overload > 0 and "overload" not in results["failed"]:
            try:
                overloads.append(overload_phase(args, work, rows, round_no))
            except Exception as exc:  # like a system that cannot start: the rest stands
                log(f"overload phase failed: {exc}")
                results["failed"]["overload"] = str(exc)[-2000:]
    if overloads:
        results["overload"] = combine_overload(overloads)
    models = _trained_models(work, args.rdv_models)
    if models is None and (work / "model-data" / "models").is_dir():  # trained for baselines
        models = work / "model-data" / "models"
    axes.bench_axes(args, work / "axes", models, results)
    results["systems"] = {name: combine_rounds(figures) for name, figures in runs.items()}
    machine["loadavg_at_end"] = list(os.getloadavg())
    results["ratios"] = ratios(results)
    results["notes"] += _notes(results)
    if args.keep_work or results["failed"]:
        log(f"work folder kept: {work}")
    else:  # every round's data folder, Redis files and archive: hundreds of MB a run
        shutil.rmtree(work, ignore_errors=True)
    return results


def _train(work: Path) -> Path:
    from models.registry import ModelRegistry
    from models.train import DEMO_MODEL, REAL_VERSION, train_demo

    registry = ModelRegistry(work / "model-data" / "models")
    train_demo(registry)
    return registry.artifact_path(DEMO_MODEL, REAL_VERSION)


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for name, system in results["systems"].items():
        other = max(ph["machine"]["other_cpu_s"] for ph in system["phases"].values())
        wall = max(ph["machine"]["wall_s"] for ph in system["phases"].values())
        if other > 0.1 * wall:
            notes.append(
                f"{name}: up to {other:.1f} CPU s per load went to other processes "
                "on this machine (noise)"
            )
        refused = sum(ph.get("refused", 0) for ph in system["phases"].values())
        if refused:
            notes.append(f"{name}: {refused} requests refused with 429 (not in the errors)")
        if not system["labels_agree_with_onnxruntime"]:
            notes.append(f"{name}: answers differ from onnxruntime's labels")
    for name, why in results["failed"].items():
        notes.append(f"{name} did not run: {why.splitlines()[0] if why else '?'}")
    return notes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like an error: every system started (each its own session, out of reach
    # of a signal to this process group) is stopped on the way out, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.render:
        results = json.loads(args.render.read_text())
        results["ratios"] = ratios(results)
        out = args.render.resolve().parent
    else:
        results = bench(args)
        out = args.out
    stem = write(results, out, plot=not args.no_plot)
    print(markdown(results))
    log(f"results in {stem}.json / .md" + ("" if args.no_plot else " / .png"))
    if args.update_readme:
        update_readme(stem.resolve(), results)


if __name__ == "__main__":
    main()
