"""The drift benchmark (issue 16): how many requests a broken feed takes to be alerted, how many
normal ones its alerts take to clear, and how often stationary traffic alarms.

A fresh ``rdv serve`` with its defaults (two gateway processes on two cores or more) gets
steady single-row traffic at ``--rate`` (400/s) in an open loop: one request scheduled every
1/rate s whatever the answers do, rows drawn from the breast-cancer data set (training and
held-out rows alike). After a warm-up, ``--stationary`` requests (20,000) are sent unchanged and
every alert raised meanwhile counts as a false alarm. Then the faults, one at a time: each
changes the rows of every request for ``--hold`` requests (or, for the subtle ones, until
alerted or ``--subtle-hold``), then the traffic is normal again until no alert is left, and
``--gap`` more normal requests separate it from the next fault.

Requests to first alert: the faulty requests sent before the first alert that became active
after the fault began (its ``since_ms``, when it entered the ``alerts`` list of
``GET /v1/deployments/{d}/drift``). Requests to clear: the normal requests sent after the fault
ended before the list was empty (the time of the last ``cleared`` event). Both clocks are this
machine's.

Offline, the same detector code (``rendezvous.drift_detect`` and ``rendezvous.drift_prior``:
every online kind, the feature detectors on every row as the log bin runs them, the prediction
prior in two gateway processes each judging half the rows) replays ``--far-rows`` stationary
rows drawn from the whole data set and from the 143 held-out rows alone, and counts alarms per
100,000 requests, with a 95 % upper bound (none in N rows: 3.0 / N).

This module runs it and writes the report; the data and the faults are ``drift_faults``'s, the
open-loop sender ``drift_sender``'s.

    python -m benchmarks.drift_bench            # or: make bench-drift
    python -m benchmarks.drift_bench --quick    # a short run (fewer faults, 4,000 stationary)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.drift_faults import TARGETS, Data, Fault, faults
from benchmarks.drift_sender import DEPLOYMENT, Sender
from benchmarks.systems import REPO, start_rdv
from rendezvous.drift_detect import FeatureDetectors
from rendezvous.drift_prior import PriorDetector
from rendezvous.drift_profile import FeatureProfile
from rendezvous.spec import FeatureSpec

DRIFT = f"/v1/deployments/{DEPLOYMENT}/drift"
POLL_S = 0.05


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the live run ------------------------------------------------------------------------------


async def drift(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get(DRIFT)
    response.raise_for_status()
    doc: dict[str, Any] = response.json()
    return doc


async def wait_for(sender: Sender, phase: str, requests: int, stop: asyncio.Event) -> None:
    while sender.count(phase) < requests and not stop.is_set():  # noqa: ASYNC110 - polled
        await asyncio.sleep(POLL_S)


async def run_fault(
    http: httpx.AsyncClient, sender: Sender, data: Data, fault: Fault, args: argparse.Namespace
) -> dict[str, Any]:
    phase, recovery = f"fault:{fault.name}", f"recovery:{fault.name}"
    began = time.time()
    sender.switch(fault.rows, phase)
    hold = args.subtle_hold if fault.group == "subtle" else args.hold
    first: dict[str, Any] | None = None
    while sender.count(phase) < hold:
        await asyncio.sleep(POLL_S)
        if first is None:
            new = [a for a in (await drift(http))["alerts"] if a["since_ms"] >= began * 1000]
            if new:
                first = min(new, key=lambda a: a["since_ms"])
                if fault.group == "subtle" and sender.count(phase) >= args.hold:
                    break  # alerted: no need to hold a slow fault longer
    doc = await drift(http)
    raised = [e for e in doc["events"] if e["type"] == "raised" and e["ts_ms"] >= began * 1000]
    if first is None and raised:
        first = min(raised, key=lambda e: e["ts_ms"])
        first = {**first, "since_ms": first["ts_ms"]}
    ended = time.time()
    sender.switch(data.normal, recovery)
    cleared_at = None
    while sender.count(recovery) < args.clear_timeout:
        await asyncio.sleep(POLL_S)
        doc = await drift(http)
        if not doc["alerts"]:
            clears = [e["ts_ms"] for e in doc["events"] if e["type"] == "cleared"]
            cleared_at = max([ended * 1000, *clears]) / 1000
            break
    kinds = sorted({(e["kind"], e.get("feature")) for e in raised}, key=str)
    shown = ("kind", "feature", "detail", "value", "threshold")
    to_first = None if first is None else sender.count(phase, first["since_ms"] / 1000)
    to_clear = None if cleared_at is None else sender.count(recovery, cleared_at)
    target_first, target_clear = TARGETS[fault.group]
    met = (
        to_first is not None
        and to_first <= target_first
        and (target_clear is None or (to_clear if to_clear is not None else 10**9) <= target_clear)
    )
    result = {
        "fault": fault.name,
        "group": fault.group,
        "held_requests": sender.count(phase),
        "first_alert_requests": to_first,
        "first_alert": None if first is None else {k: first.get(k) for k in shown},
        "alerts_raised": [{"kind": k, "feature": f} for k, f in kinds],
        "clear_requests": to_clear,
        "target_first": target_first,
        "target_clear": target_clear,
        "met": met,
    }
    log(f"{fault.name}: first alert after {to_first} requests "
        f"({first and first.get('kind')}), cleared after {to_clear}")  # fmt: skip
    await wait_for(sender, recovery, sender.count(recovery) + args.gap, asyncio.Event())
    return result


async def live(args: argparse.Namespace, data: Data, base_url: str) -> dict[str, Any]:
    host, port = base_url.removeprefix("http://").split(":")
    rng = np.random.default_rng(args.seed)
    sender = Sender(host, int(port), args.rate, data.normal, rng,
                    stagger_s=0.0 if args.burst_connect else 0.02)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        try:
            await wait_for(sender, "warm-up", args.warmup, stop)
            log(f"warm-up done ({args.warmup} requests); stationary {args.stationary}")
            began = time.time()
            sender.switch(data.normal, "stationary")
            await wait_for(sender, "stationary", args.stationary, stop)
            doc = await drift(http)
            raised = [e for e in doc["events"]
                      if e["type"] == "raised" and e["ts_ms"] >= began * 1000]  # fmt: skip
            out["stationary"] = {
                "requests": sender.count("stationary"),
                "false_alarms": len(raised),
                "alerts": [{k: e.get(k) for k in ("kind", "feature", "detail")} for e in raised],
                "active_at_end": doc["alerts"],
            }
            log(f"stationary: {len(raised)} alerts in {sender.count('stationary')} requests")
            if doc["alerts"]:  # start the faults from a clean list
                await wait_for(sender, "stationary", args.stationary + args.clear_timeout, stop)
            out["faults"] = []
            chosen = faults(data)
            if args.quick:
                chosen = [f for i, f in enumerate(chosen) if i in (0, 1, 3, 7, 9, 11)]
            for fault in chosen:
                out["faults"].append(await run_fault(http, sender, data, fault, args))
            online = (await drift(http)).get("online") or {}
            out["feature_rows_judged"] = {k: v["rows"] for k, v in online.items() if "rows" in v}
            out["prior_rows_judged"] = {k: v["prior"]["rows"] for k, v in online.items()
                                        if isinstance(v.get("prior"), dict)}  # fmt: skip
        finally:
            stop.set()
            await task
    out["requests_sent"] = sender.sent
    out["statuses"] = {str(k): v for k, v in sorted(sender.statuses.items())}
    out["sender_late_s"] = round(sender.late_s, 3)
    return out


# -- the offline false-alarm rate --------------------------------------------------------------


def offline_far(
    data: Data, base: np.ndarray, rows: int, seed: int, models_dir: Path | None = None
) -> dict[str, Any]:
    """Every online detector as ``rdv serve`` runs it, on ``rows`` stationary rows drawn from
    ``base``: the feature detectors on every row (the log bin), the prediction prior on real's
    labels of those rows in two gateway processes each judging half of them (the demo's real
    model from ``models_dir``, else trained afresh)."""
    from models.registry import ModelRegistry  # only here: onnxruntime, training
    from models.runtime import OnnxClassifier
    from models.train import train_demo

    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(models_dir or Path(tmp) / "models")
        if models_dir is None:
            train_demo(registry)
        meta = registry.meta("breast-cancer", 2)
        model = OnnxClassifier(registry.artifact_path("breast-cancer", 2), meta)
        positive = model.predict(base.astype(np.float32))[1][:, 1] >= 0.5
    share = float(sum(meta.score_reference[5:]))  # type: ignore[index]
    spec = FeatureSpec(names=tuple(data.names), stats=data.stats)
    profile = FeatureProfile.from_spec(spec)
    assert profile is not None
    rng = np.random.default_rng(seed)
    features = FeatureDetectors(profile)
    processes = [PriorDetector(share) for _ in range(2)]
    alarms: dict[str, int] = {}
    done = 0
    while done < rows:
        idx = rng.integers(0, len(base), 16)
        prior = processes[(done // 16) % 2]
        raised, _ = features.update(base[idx])
        what, alert = prior.update(positive[idx])
        for a in raised + ([alert] if what == "raised" else []):
            alarms[a["kind"]] = alarms.get(a["kind"], 0) + 1
        done += 16
    total = sum(alarms.values())
    upper = (3.0 if total == 0 else total + 2 * math.sqrt(total) + 2) * 100_000 / done
    return {"rows": done, "alarms": alarms, "per_100k": round(total * 100_000 / done, 4),
            "per_100k_upper_95": round(upper, 4)}  # fmt: skip


# -- the report --------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = [
        "| fault | first alert (requests) | kind / feature | clear (requests) | target | met |",
        "|---|---:|---|---:|---|---|",
    ]
    for f in result["live"].get("faults", []):
        first = f["first_alert"] or {}
        what = f"{first.get('kind')} / {first.get('feature') or '-'}" if first else "none"
        target = str(f["target_first"])
        if f["target_clear"]:
            target += f", clear {f['target_clear']}"
        met = "yes" if f["met"] else "NO"
        lines.append(f"| {f['fault']} | {f['first_alert_requests']} | {what} | "
                     f"{f['clear_requests']} | {target} | {met} |")  # fmt: skip
    st = result["live"].get("stationary", {})
    lines.append("")
    lines.append(f"Stationary: {st.get('false_alarms')} alerts in {st.get('requests')} requests.")
    judged = result["live"].get("feature_rows_judged")
    if judged:
        lines.append(f"Rows judged by the feature detectors (log bin): {judged}.")
    prior = result["live"].get("prior_rows_judged")
    if prior:
        lines.append(f"Rows judged by the prediction prior, per gateway process: {prior}.")
    for name, far in result.get("offline", {}).items():
        lines.append(f"Offline ({name}): {sum(far['alarms'].values())} alarms in {far['rows']:,} "
                     f"rows = {far['per_100k']} per 100,000 (95 % upper bound "
                     f"{far['per_100k_upper_95']})")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--warmup", type=int, default=4000)
    p.add_argument("--stationary", type=int, default=20_000)
    p.add_argument("--hold", type=int, default=1000, help="requests a fault lasts")
    p.add_argument("--subtle-hold", type=int, default=6000)
    p.add_argument("--clear-timeout", type=int, default=6000)
    p.add_argument("--gap", type=int, default=2000)
    p.add_argument("--far-rows", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-live", action="store_true", help="the offline rates only")
    p.add_argument(
        "--burst-connect",
        action="store_true",
        help="open the connections at once (one gateway process then takes most of them)",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.stationary, args.warmup, args.far_rows, args.gap = 4000, 2000, 200_000, 1000
    return args


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Data.load()
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "live": {},
    }
    if not args.no_live:
        with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
            log("starting rdv serve (trains the demo models)")
            running = start_rdv(Path(tmp) / "data", Path(tmp), name="drift")
            try:
                log(f"serving on {running.base_url}; {args.rate:.0f} requests/s")
                result["live"] = asyncio.run(live(args, data, running.base_url))
            finally:
                code = running.stop()
                result["live"]["exit_code"] = code
    if args.far_rows > 0:
        log(f"offline false-alarm rate over {args.far_rows:,} rows per traffic")
        result["offline"] = {
            "whole data set": offline_far(data, data.x, args.far_rows, args.seed),
            "held-out rows only": offline_far(data, data.held_out, args.far_rows, args.seed + 1),
        }
    text = table(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"drift-{result['started'][:10]}-{result['commit']}"
    if args.burst_connect:
        stem += "-burst"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    log(f"results in {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
