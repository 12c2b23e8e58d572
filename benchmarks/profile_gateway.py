"""Where the time goes: ``rdv serve`` under load, sampled by py-spy, summarised per process.

Starts ``rdv serve`` on a fresh data folder, drives it with the benchmark's load generator at
one concurrency, and meanwhile records every Python process of the system (gateway, workers,
log bin) with ``py-spy record --format raw`` (installed into ``benchmarks/.venv-tools``). Then
it prints, per process, the CPU seconds per request, the share of samples by package (by the
innermost Python frame) and the inclusive share of the functions on the request path.

    python -m benchmarks.profile_gateway [--duration 20] [--concurrency 64] [--out DIR]

The summary goes to ``benchmarks/results/profile-<date>-<commit>.json``; the folded stacks
(inputs for any flame-graph tool) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks import procstat
from benchmarks.axis_common import TOKEN, with_bodies
from benchmarks.axis_deployments import all_live, create_deployments
from benchmarks.axis_load import add_challengers
from benchmarks.harness import git, log
from benchmarks.loadgen import Load, run_load
from benchmarks.systems import REPO, start_rdv
from benchmarks.venvs import ensure_tools

CATEGORIES = (
    ("(gateway/dataplane/validation.py", "gateway: validation + to_matrix"),
    ("(gateway/dataplane/service.py", "gateway: service"),
    ("(gateway/", "gateway: app, limits, admin"),
    ("(rendezvous/envelope.py", "rendezvous: envelope encode/decode"),
    ("(rendezvous/decision.py", "rendezvous: decision records"),
    ("(rendezvous/divergence.py", "rendezvous: divergence"),
    ("(rendezvous/", "rendezvous: matcher, appender, schedule"),
    ("(models/archive.py", "models: archive (gzip, fsync)"),
    ("(models/", "models: worker, log bin"),
    ("(redis/", "redis-py"),
    ("(fastapi/", "fastapi"),
    ("(starlette/", "starlette"),
    ("(uvicorn/", "uvicorn (http protocol)"),
    ("(pydantic", "pydantic"),
    ("(onnxruntime/", "onnxruntime"),
    ("(numpy/", "numpy"),
    ("(msgpack/", "msgpack"),
    ("(asyncio/runners.py", "event loop (uvloop, C)"),
    ("(asyncio/", "asyncio (Python)"),
    ("(json/", "json (stdlib)"),
    ("(gzip.py", "gzip"),
    ("(logging/", "logging"),
    ("(contextlib.py", "contextlib"),
)

PATH_FUNCTIONS = (
    "run_asgi (uvicorn/",
    "__call__ (gateway/transport/limits.py",
    "predict (gateway/transport/app.py",
    "predict (gateway/dataplane/service.py",
    "parse_body",
    "to_matrix",
    "_publish_and_wait",
    "encode (rendezvous/envelope.py",
    "append (rendezvous/bus/appender.py",
    "_flush (rendezvous/bus/appender.py",
    "render (starlette/responses.py",
    "_read_loop",
    "decode (rendezvous/envelope.py",
    "file (gateway/dataplane/matcher.py",
    "_evaluate",
    "_close (gateway/dataplane/matcher.py",
    "build_decision",
    "divergence (rendezvous/divergence.py",
    "encode (rendezvous/decision.py",
    "refresh (gateway/dataplane/service.py",
    "execute (redis/asyncio/client.py",
    "read_response",
    "pack_commands",
    "step (models/worker.py",
    "_read (models/worker.py",
    "_handle (models/worker.py",
    "_score (models/worker.py",
    "predict (models/runtime.py",
    "step (models/logbin.py",
    "append_batch (models/archive.py",
    "_fsync (models/archive.py",
    "_gzip_member (models/archive.py",
)


def _category(frame: str) -> str:
    for pattern, name in CATEGORIES:
        if pattern in frame:
            return name
    return "other: " + frame.split("(", 1)[-1].rsplit("/", 1)[-1].rstrip(")")


def summarise(folded: Path) -> dict[str, object]:
    """Samples by package of the innermost frame, and inclusive shares of path functions."""
    by_category: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf_functions: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        by_category[_category(frames[-1])] += count
        leaf_functions[frames[-1]] += count
        seen = {name for name in PATH_FUNCTIONS if any(name in f for f in frames)}
        for name in seen:
            inclusive[name] += count

    def share(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(n)] if total else []

    return {
        "samples": total,
        "self_by_package_pct": share(by_category, 25),
        "inclusive_pct": share(inclusive, len(PATH_FUNCTIONS)),
        "top_leaf_functions_pct": share(leaf_functions, 20),
    }


def _median(values: list[float]) -> float | None:
    return round(float(statistics.median(values)), 3) if values else None


def latency_budget(redis_port: int, client_ms: list[float], last: int) -> dict[str, object]:
    """Medians over the latest decision records: where a c1 request's time goes."""
    import redis

    from rendezvous.decision import decode_entries

    client = redis.Redis(port=redis_port)
    try:
        entries = client.xrevrange("rdv:{breast-cancer}:decisions", count=last)
    finally:
        client.close()
    records = decode_entries(entries)
    answered = [r.answered_after_ms for r in records if r.answered_after_ms]
    out: dict[str, object] = {
        "records": len(records),
        "client_p50_ms": _median(client_ms),
        "gateway_answered_after_ms_p50": _median(answered),
    }
    for role in ("real", "canary"):
        outputs = [r.outputs[role] for r in records if role in r.outputs]
        queue = [o.queue_ms for o in outputs]
        model = [o.model_latency_ms for o in outputs]
        arrived = [o.arrived_ms for o in outputs if o.arrived_ms is not None]
        out[role] = {
            "queue_ms_p50": _median(queue),
            "model_latency_ms_p50": _median(model),
            "arrived_ms_p50": _median(arrived),
        }
    return out


def worker_counters(redis_port: int) -> dict[str, tuple[int, int]]:
    """(requests scored, batches) of each role of the demo deployment, from the counters its
    workers publish with their heartbeats."""
    import redis

    from rendezvous import names

    client = redis.Redis(port=redis_port)
    try:
        raw = client.hgetall(names.stats_key("breast-cancer"))
    finally:
        client.close()
    out: dict[str, tuple[int, int]] = {}
    for member, value in raw.items():
        stats = json.loads(value)
        role = member.decode().split("|", 1)[0]
        scored, batches = out.get(role, (0, 0))
        out[role] = (scored + stats["scored"], batches + stats["batches"])
    return out


def _redis_port(tree: procstat.ProcessTree) -> int:
    for pid, name in tree.members().items():
        if name == "redis":
            # redis-server retitles itself "redis-server 127.0.0.1:PORT"
            args = procstat.cmdline(pid).split()
            if "--port" in args:
                return int(args[args.index("--port") + 1])
            return int(args[1].rsplit(":", 1)[1])
    raise RuntimeError("no redis-server in the process tree")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_gateway", description=__doc__)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--open-rate",
        type=float,
        help="an open loop at this many requests a second instead of --concurrency "
        "(the soak's kind of load: where batches are small)",
    )
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--gateway-processes", type=int)
    p.add_argument("--loadgen-procs", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="demo rows per request")
    p.add_argument(
        "--challengers",
        type=int,
        default=0,
        choices=range(0, 4),
        help="shadowing challengers (the real model's bytes again), as the axis",
    )
    p.add_argument(
        "--deployments",
        type=int,
        default=1,
        help="deployments served (the others idle, as the deployments axis)",
    )
    p.add_argument(
        "--gil",
        action="store_true",
        help="sample only threads holding the GIL (a worker host's idle threads "
        "blocked in a read otherwise count as busy)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="RDV_NAME=VALUE",
        help="a setting of the served system (again for more)",
    )
    p.add_argument("--out", type=Path, help="folder for the folded stacks (default: temporary)")
    p.add_argument("--summary", type=Path, help="summary JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    py_spy = ensure_tools(log).with_name("py-spy")
    work = Path(tempfile.mkdtemp(prefix="rdv-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(item.split("=", 1) for item in args.set)
    if args.challengers or args.deployments > 1:
        settings["RDV_ADMIN_TOKEN"] = TOKEN
    running = start_rdv(work / "data", work, args.gateway_processes, settings=settings or None)
    report: dict[str, object] = {}
    try:
        target = with_bodies(running, args.rows).target
        if args.challengers:
            add_challengers(running, work / "data" / "models", args.challengers)
        if args.deployments > 1:
            names = create_deployments(running, work / "data" / "models", args.deployments)
            all_live(running, names, timeout_s=60.0 + 10.0 * args.deployments)
        run_load(target, Load("closed", args.concurrency, duration_s=2.0), args.loadgen_procs)
        c1, _ = run_load(target, Load("closed", 1, duration_s=5.0), 1)
        budget = latency_budget(_redis_port(running.tree), list(c1.latencies_ms), 2000)
        log(f"c1 latency budget: {budget}")
        report["c1_latency_budget"] = budget
        members = {
            pid: name
            for pid, name in running.tree.members().items()
            if name not in ("redis", "supervisor")
        }
        spies = {}
        for pid, name in members.items():
            folded = out / f"{name.replace(':', '-')}-{pid}.folded"
            spies[pid] = (
                folded,
                subprocess.Popen(
                    [str(py_spy), "record", "--pid", str(pid), "--rate", str(args.rate),
                     "--duration", str(int(args.duration)), "--format", "raw", "--nonblocking",
                     "--output", str(folded), *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ),
            )  # fmt: skip
        port = _redis_port(running.tree)
        counted = worker_counters(port)
        before = procstat.TreeSample.take(running.tree)
        load = (
            Load("open", args.concurrency, rate=args.open_rate, duration_s=args.duration)
            if args.open_rate
            else Load("closed", args.concurrency, duration_s=args.duration)
        )
        result, _ = run_load(target, load, args.loadgen_procs)
        after = procstat.TreeSample.take(running.tree)
        for _folded, spy in spies.values():
            spy.wait(60)
        ok = len(result.latencies_ms)
        cpu = procstat.cpu_between(before, after)
        log(f"{ok} requests answered in {args.duration:g} s ({ok / args.duration:.0f} req/s)")
        for pid, name in members.items():
            folded = spies[pid][0]
            part: dict[str, object] = summarise(folded) if folded.exists() else {"samples": 0}
            part["cpu_s"] = cpu.get(name)
            part["cpu_us_per_request"] = round(cpu.get(name, 0) / max(ok, 1) * 1e6, 1)
            report[f"{name} ({pid})"] = part
        report["cpu_s_by_component"] = cpu
        report["requests"] = ok
        report["latency_ms"] = {q: round(float(np.percentile(result.latencies_ms, q)), 3)
                                for q in (50, 99)} if ok else {}  # fmt: skip
        time.sleep(1.5)  # the workers' counters ride their heartbeats (every second)
        report["requests_per_batch"] = {
            role: round((scored - counted.get(role, (0, 0))[0])
                        / max(batches - counted.get(role, (0, 0))[1], 1), 2)
            for role, (scored, batches) in worker_counters(port).items()
        }  # fmt: skip
        log(f"requests a batch by role: {report['requests_per_batch']}; "
            f"latency {report['latency_ms']}")  # fmt: skip
    finally:
        running.stop()
        # The served system's data (its archive and Redis's append-only log: hundreds of MB
        # a run) goes; the folded stacks and the gateway's log stay.
        shutil.rmtree(work / "data", ignore_errors=True)
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": procstat.machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **report,
    }
    text = json.dumps(report, indent=1)
    path: Path = args.summary or REPO / "benchmarks" / "results" / (
        f"profile-{report['date']}-{commit}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    log(f"summary in {path}, folded stacks in {out}")


if __name__ == "__main__":
    main()
