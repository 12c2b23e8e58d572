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

One file: the run's whole order (options, rounds over the systems, the files written) reads
best in one place; the parts it calls are in loadgen, systems, procstat, redisstat and
report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import procstat, redisstat
from benchmarks.loadgen import Load, run_load
from benchmarks.report import (
    SYSTEM_TITLES,
    combine_rounds,
    latency_figures,
    markdown,
    ratios,
    summary_markdown,
)
from benchmarks.systems import (
    REPO,
    Running,
    ensure_tools,
    start_echo,
    start_inprocess,
    start_mlserver,
    start_rdv,
    start_rdv_cluster,
)

SYSTEMS = ("gateway", "gateway-cluster", "gateway-cluster-replicated", "inprocess", "mlserver")
RDV_SYSTEMS = ("gateway", "gateway-cluster", "gateway-cluster-replicated")
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2 s per load, concurrency 1 and 64")
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
    from benchmarks import axes  # it imports this module

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


def demo_rows() -> list[list[float]]:
    from models.train import demo_data

    # 7 significant digits: the float32 values of the data, written as a client would.
    return [[float(f"{v:.7g}") for v in row] for row in demo_data().x_test.tolist()]


def run_phase(running: Running, load: Load, procs: int) -> dict[str, Any]:
    tree = running.tree
    marks: dict[str, Any] = {}

    def on_start() -> None:
        marks["self"] = resource.getrusage(resource.RUSAGE_SELF)
        marks["a"] = procstat.TreeSample.take(tree)
        marks["redis"] = _redis_sample(running)

    result, loadgen_cpu = run_load(running.target, load, procs, on_start=on_start)
    b = procstat.TreeSample.take(tree)
    redis_after = _redis_sample(running)
    me = resource.getrusage(resource.RUSAGE_SELF)
    a, me0 = marks["a"], marks["self"]
    harness_cpu = (me.ru_utime - me0.ru_utime) + (me.ru_stime - me0.ru_stime)
    cpu = procstat.cpu_between(a, b)
    server_cpu = sum(cpu.values())
    lg_cpu = sum(loadgen_cpu)
    ok = len(result.latencies_ms)
    refused = len(result.refused_ms)
    busy = b.machine_busy_s - a.machine_busy_s
    redis_figures = None
    if marks.get("redis") is not None and redis_after is not None:
        redis_figures = redisstat.delta(marks["redis"], redis_after, ok)
    return {
        "mode": load.mode,
        "concurrency": load.concurrency if load.mode == "closed" else None,
        "rate": load.rate if load.mode == "open" else None,
        "duration_s": load.duration_s,
        "sent": result.sent,
        "ok": ok,
        "refused": refused,
        "errors": result.sent - ok - refused,
        "statuses": dict(result.statuses),
        "throughput_rps": round(ok / result.elapsed_s, 1),
        "refused_rps": round(refused / result.elapsed_s, 1),
        "latency_ms": latency_figures(result.latencies_ms),
        "refusal_latency_ms": latency_figures(result.refused_ms),
        "cpu_s": {**cpu, "total": round(server_cpu, 3)},
        "cpu_us_per_request": round(server_cpu / ok * 1e6, 1) if ok else None,
        "cpu_busiest_share": procstat.busiest_share(a, b),
        "loadgen": {
            "procs": len(loadgen_cpu),
            "cpu_s": round(lg_cpu, 3),
            "cpu_us_per_request": round(lg_cpu / max(result.sent, 1) * 1e6, 1),
            "cpu_utilisation": round(lg_cpu / (len(loadgen_cpu) * load.duration_s), 3),
            "send_lag_ms": _lag(result.send_lag_ms),
        },
        "machine": {
            "wall_s": round(b.t - a.t, 3),
            "busy_cpu_s": round(busy, 3),
            "steal_cpu_s": round(b.machine_steal_s - a.machine_steal_s, 3),
            "harness_cpu_s": round(harness_cpu, 3),
            "other_cpu_s": round(busy - server_cpu - lg_cpu - harness_cpu, 3),
        },
        "redis": redis_figures,
    }


def _redis_sample(running: Running) -> dict[redisstat.Node, redisstat.NodeSample] | None:
    if not running.redis_nodes:
        return None
    try:
        return redisstat.sample(running.redis_nodes)
    except Exception as exc:  # a figure missing must not sink the phase
        log(f"{running.name}: no Redis counts: {exc}")
        return None


def _lag(lags_ms: Sequence[float]) -> dict[str, float] | None:
    if not lags_ms:
        return None
    figures = latency_figures(lags_ms)
    return {k: figures[k] for k in ("p50", "p99", "max")}


def measure(
    running: Running,
    args: argparse.Namespace,
    rows: list[list[float]],
    expected: list[int],
    startup_s: float,
) -> dict[str, Any]:
    target = dataclasses.replace(
        running.target, bodies=tuple(json.dumps(running.body(r)).encode() for r in rows)
    )
    running.target = target
    agree = [running.predict_labels(r)[0] for r in rows[: len(expected)]] == expected
    if not agree:
        log(f"{running.name}: labels differ from onnxruntime's on the same rows")
    loads = [Load("closed", c, duration_s=args.duration) for c in args.concurrency]
    if args.rate > 0:
        loads.append(Load("open", rate=args.rate, duration_s=args.duration))
    phases: dict[str, Any] = {}
    with procstat.MemoryWatch(running.tree) as mem:
        if args.warmup > 0:
            warm = Load("closed", max(args.concurrency), duration_s=args.warmup)
            run_load(target, warm, args.loadgen_procs)
        for load in loads:
            phases[load.label] = phase = run_phase(running, load, args.loadgen_procs)
            lat = phase["latency_ms"]
            cmds = (phase["redis"] or {}).get("commands_per_request")
            log(
                f"{running.name} {load.label}: {phase['throughput_rps']:.0f} req/s, "
                f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, errors {phase['errors']}"
                + (f", {cmds} Redis commands/req" if cmds is not None else "")
            )
    members = running.tree.members()
    hwm = sum(procstat.hwm_bytes(p) for p in members)
    return {
        "title": SYSTEM_TITLES[running.name],
        "info": running.info,
        "startup_s": round(startup_s, 2),
        "labels_agree_with_onnxruntime": agree,
        "processes": len(members),
        "process_components": sorted(set(members.values())),
        "rss_mb": {
            "peak_total": round(mem.peak_total_bytes / procstat.MB, 1),
            "peak_serving_total": round(mem.peak_serving_bytes / procstat.MB, 1),
            "peak_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.peak_by_component.items()
            },
            "end_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.last_by_component.items()
            },
            "sum_of_process_hwm": round(hwm / procstat.MB, 1),
            "peak_serving_pss": round(mem.peak_serving_pss_bytes / procstat.MB, 1),
            "peak_pss_by_component": {
                k: round(v / procstat.MB, 1) for k, v in mem.peak_pss_by_component.items()
            },
        },
        "phases": phases,
    }


def overload_phase(
    args: argparse.Namespace, work: Path, rows: list[list[float]], round_no: int
) -> dict[str, Any]:
    """A fresh ``rdv serve`` whose gateway processes hold at most ``--overload-max-in-flight``
    requests each, under a closed loop of ``--overload`` connections: nearly every request
    finds its process full, so the phase measures how fast a refusal comes (a closed loop's
    latency is its connections over the answers per second, so this is also how many
    refusals a second the gateway gives while it serves its bound). Then the do-nothing
    server under the same loop: the floor of that latency on this machine."""
    data = work / f"rdv-overload-{round_no}"
    for trained in (work / "rdv-data-1" / "models", work / "rdv-overload-1" / "models"):
        if trained.is_dir() and not (data / "models").exists():
            shutil.copytree(trained, data / "models")
    settings = {**dict(args.set), "RDV_MAX_IN_FLIGHT": str(args.overload_max_in_flight)}
    running = start_rdv(data, work, args.gateway_processes, settings=settings)
    try:
        running.target = dataclasses.replace(
            running.target, bodies=tuple(json.dumps(running.body(r)).encode() for r in rows)
        )
        if args.warmup > 0:  # within the bound: the models and the path warm, no refusal
            warm = Load("closed", args.overload_max_in_flight, duration_s=min(args.warmup, 1.0))
            run_load(running.target, warm, args.loadgen_procs)
        load = Load("closed", args.overload, duration_s=args.overload_duration)
        phase = run_phase(running, load, args.loadgen_procs)
    finally:
        running.stop()
        time.sleep(1.0)
    echo = start_echo(work)
    try:
        echo.target = dataclasses.replace(echo.target, bodies=running.target.bodies)
        floor = run_phase(echo, load, args.loadgen_procs)
    finally:
        echo.stop()
    phase["echo_reference"] = {
        "throughput_rps": floor["throughput_rps"],
        "latency_ms": {k: floor["latency_ms"].get(k) for k in ("p50", "p90", "p99", "max")},
        "errors": floor["errors"],
    }
    phase["max_in_flight"] = args.overload_max_in_flight
    phase["refused_share"] = round(phase["refused"] / max(phase["sent"], 1), 4)
    ok, no = phase["latency_ms"], phase["refusal_latency_ms"]
    log(
        f"overload c{args.overload} (bound {args.overload_max_in_flight} per process): "
        f"429 p50 {no.get('p50')} ms p99 {no.get('p99')} ms ({phase['refused_rps']:.0f}/s, "
        f"{phase['refused_share']:.1%}); 200 p50 {ok.get('p50')} ms p99 {ok.get('p99')} ms "
        f"({phase['throughput_rps']:.0f}/s); errors {phase['errors']}; a do-nothing server: "
        f"p50 {floor['latency_ms'].get('p50')} ms ({floor['throughput_rps']:.0f}/s)"
    )
    return phase


def combine_overload(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median 429 p50, whole, with every round's figures beside it."""
    ordered = sorted(phases, key=lambda ph: ph["refusal_latency_ms"].get("p50") or 0.0)
    median = dict(ordered[len(ordered) // 2])
    median["rounds"] = {
        "refusal_p50_ms": [ph["refusal_latency_ms"].get("p50") for ph in phases],
        "refusal_p99_ms": [ph["refusal_latency_ms"].get("p99") for ph in phases],
        "refused_rps": [ph["refused_rps"] for ph in phases],
        "ok_p50_ms": [ph["latency_ms"].get("p50") for ph in phases],
        "refused_share": [ph["refused_share"] for ph in phases],
        "echo_p50_ms": [ph["echo_reference"]["latency_ms"].get("p50") for ph in phases],
        "errors": [ph["errors"] for ph in phases],
    }
    return median


def calibrate(args: argparse.Namespace, work: Path, rows: list[list[float]]) -> dict[str, Any]:
    """The load generator against a do-nothing server at the highest concurrency: what it
    reaches there bounds from below what it can drive, on this machine, in this run."""
    echo = start_echo(work)
    try:
        echo.target = dataclasses.replace(
            echo.target, bodies=tuple(json.dumps(echo.body(r)).encode() for r in rows)
        )
        load = Load("closed", max(args.concurrency), duration_s=min(args.duration, 3.0))
        phase = run_phase(echo, load, args.loadgen_procs)
    finally:
        echo.stop()
    log(f"load generator ceiling: {phase['throughput_rps']:.0f} req/s at {load.label} "
        f"against a do-nothing server")  # fmt: skip
    return phase


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip()


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
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
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
    from benchmarks.axes import bench_axes

    models = _trained_models(work, args.rdv_models)
    if models is None and (work / "model-data" / "models").is_dir():  # trained for baselines
        models = work / "model-data" / "models"
    bench_axes(args, work / "axes", models, results)
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


def write(results: dict[str, Any], out: Path, plot: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{results['date']}-{results['commit']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    if plot:
        try:
            python = ensure_tools(log)
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "benchmarks.plot",
                    str(stem.with_suffix(".json")),
                    str(stem.with_suffix(".png")),
                ],
                cwd=REPO,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            log(f"no plot: {exc}")
    return stem


def update_readme(stem: Path, results: dict[str, Any]) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        log("README.md has no benchmark markers; not updated")
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    rel = stem.relative_to(REPO) if stem.is_relative_to(REPO) else stem
    axes_png = ""
    if results.get("axes"):
        axes_png = f", `{rel}-axes.png` (throughput and memory against each axis of issue 18)"
    block = (
        f"{README_START}\n{summary_markdown(results)}\nEvery figure: `{rel}.md` (table), "
        f"`{rel}.json`, `{rel}.png` (latency against throughput){axes_png}.\n{README_END}"
    )
    readme.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
