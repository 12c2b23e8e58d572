"""CPU a request of the rendezvous' result path, by the number of bins that answer.

    python -m benchmarks.result_path [--requests 8000] [--batch 30] [--repeats 5]

No Redis and no HTTP: reply entries (as workers write them, ``--batch`` results each, one per
bin) are decoded, each result filed into its open mailbox, the mailboxes closed and their
decision records built and encoded, and the gateway's metrics and outcome hooks run, on uvloop.
It isolates what one more challenger costs the gateway's event loop (PROFILE.md, "What each
challenger costs"); the figure is the best of ``--repeats`` runs of process time, so compare
two trees on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import uvloop

from gateway.dataplane.matcher import Rendezvous
from gateway.observability.metrics import GatewayMetrics
from rendezvous.decision import DecisionRecord
from rendezvous.envelope import ModelResult, decode_results, encode_results
from rendezvous.outcomes import encode_record
from rendezvous.schedule import Schedule

BINS = {2: ("real", "canary"), 5: ("real", "canary", "c1", "c2", "c3")}


class _NoAppender:
    """Records are encoded but not sent: the round trip is not what is measured."""

    def append_nowait(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def _result(role: str, i: int) -> ModelResult:
    p1 = 0.8 - 0.0001 * (i % 100)
    proba = np.array([[1 - p1, p1]], dtype=np.float32)
    return ModelResult(f"req-{i}", "dep", f"m-{role}", 1, role, [1], proba, [0, 1], 0.025, 0.13)


async def _run(roles: tuple[str, ...], requests: int, batch: int) -> float:
    """Process time a request, in microseconds."""
    metrics = GatewayMetrics()

    def hook(record: DecisionRecord) -> None:
        metrics.decision(record)
        encode_record(record)

    matcher = Rendezvous(None, None, "reply", _NoAppender(), on_decision=hook)  # type: ignore[arg-type]
    schedule = Schedule()
    starts = range(0, requests, batch)
    entries = [
        [encode_results([_result(role, i) for i in range(s, s + batch)]) for role in roles]
        for s in starts
    ]
    t0 = time.process_time()
    for s, batch_entries in zip(starts, entries, strict=True):
        for i in range(s, s + batch):
            matcher.open(f"req-{i}", "dep", schedule, list(roles))
        for entry in batch_entries:
            results, _errors = decode_results(entry)
            for result in results:
                matcher.file(result)
        await asyncio.sleep(0)  # the closed mailboxes' records are written at the turn's end
        await asyncio.sleep(0)
    elapsed = time.process_time() - t0
    if matcher.mailboxes:
        raise RuntimeError(f"{len(matcher.mailboxes)} mailboxes were left open")
    metrics.flush()
    return elapsed / (len(starts) * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=30, help="results per reply entry")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures = {}
    for bins, roles in BINS.items():
        runs = [uvloop.run(_run(roles, args.requests, args.batch)) for _ in range(args.repeats)]
        figures[bins] = min(runs)
        print(f"{bins} bins: {figures[bins]:.1f} us a request (best of {args.repeats})")
    per_bin = (figures[5] - figures[2]) / 3
    print(f"each bin past two: {per_bin:.1f} us a request")


if __name__ == "__main__":
    main()
