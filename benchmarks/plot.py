"""Latency against throughput, one line per system, from a results JSON.

Runs in the benchmark's tools environment (matplotlib is a benchmark-only dependency):
``python -m benchmarks.plot RESULTS.json OUT.png``; with issue 18's axes in the results, also
``OUT-axes.png`` (``plot_axes.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"gateway": "#c0392b", "inprocess": "#2471a3", "mlserver": "#7d8c8c"}


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for name, system in results["systems"].items():
        color = COLORS.get(name)
        closed = sorted(
            (ph for ph in system["phases"].values() if ph["mode"] == "closed"),
            key=lambda ph: ph["concurrency"],
        )
        opened = [ph for ph in system["phases"].values() if ph["mode"] == "open"]
        for ax, pct in zip(axes, ("p50", "p99"), strict=True):
            xs = [ph["throughput_rps"] for ph in closed if ph["latency_ms"].get(pct)]
            ys = [ph["latency_ms"][pct] for ph in closed if ph["latency_ms"].get(pct)]
            ax.plot(xs, ys, "o-", color=color, label=f"{name} (closed loop)")
            for ph, x, y in zip(closed, xs, ys, strict=False):
                ax.annotate(
                    f"c{ph['concurrency']}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=color,
                )
            for ph in opened:
                if ph["latency_ms"].get(pct):
                    ax.plot(
                        ph["throughput_rps"],
                        ph["latency_ms"][pct],
                        "s",
                        color=color,
                        mfc="none",
                        ms=9,
                        label=f"{name} (open loop {ph['rate']:g}/s)",
                    )
    for ax, pct in zip(axes, ("p50", "p99"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel(f"{pct} latency (ms)")
        ax.set_title(f"{pct} latency against throughput")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"breast-cancer GB model, {results['date']} @ {results['commit']} "
        f"({results['machine']['cpus']} CPUs)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        sys.exit("usage: python -m benchmarks.plot RESULTS.json OUT.png")
    from benchmarks.plot_axes import plot_axes

    results, out = json.loads(Path(args[0]).read_text()), Path(args[1])
    if results.get("systems"):
        plot(results, out)
    plot_axes(results, out.with_name(out.stem + "-axes.png"))


if __name__ == "__main__":
    main()
