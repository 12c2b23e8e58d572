"""Throughput and memory against each of issue 18's axes, from a results JSON with ``axes``.

Runs in the benchmark's tools environment (matplotlib), called by ``benchmarks.plot``: the
top row is throughput, the bottom row memory (RSS summed over the system's processes), one
column per axis that ran; the soak's column is over time.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

RDV, BASE = "#c0392b", "#2471a3"


def _median(phases: list[dict[str, Any]], key: str) -> float:
    values = [p[key] for p in phases if p.get(key) is not None]
    return statistics.median(values) if values else 0.0


def _bars(ax: Any, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    ax.bar(labels, values, color=[RDV, BASE, RDV, BASE][: len(values)])
    for x, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def _columns(axes: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(name, axes[name]) for name in ("challengers", "rows", "deployments", "soak")
            if name in axes]  # fmt: skip


def plot_axes(results: dict[str, Any], out: Path) -> bool:
    """Draw the axes that ran into ``out``; False if none did."""
    columns = _columns(results.get("axes") or {})
    if not columns:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, len(columns), figsize=(4.2 * len(columns), 7.5), squeeze=False)
    for col, (name, fig_data) in enumerate(columns):
        top, bottom = grid[0][col], grid[1][col]
        if name == "challengers":
            ph = fig_data["phases"]
            labels = ["no challenger", "3 challengers"]
            _bars(top, labels, [_median(ph["none"], "throughput_rps"),
                                _median(ph["three"], "throughput_rps")],
                  "req/s at c64", "challengers: throughput")  # fmt: skip
            _bars(bottom, labels, [_median(ph["none"], "rss_mb_after"),
                                   _median(ph["three"], "rss_mb_after")],
                  "RSS MB (all processes)", "challengers: memory")  # fmt: skip
        elif name == "rows":
            ph, rows = fig_data["phases"], fig_data["rows_per_request"]
            labels = ["rdv serve", "in-process"]
            _bars(top, labels, [_median(ph["gateway_c8"], "throughput_rps") * rows,
                                _median(ph["inprocess_c8"], "throughput_rps") * rows],
                  f"rows/s at c8 ({rows} a request)", "rows: throughput")  # fmt: skip
            _bars(bottom, labels, [_median(ph["gateway_c8"], "rss_mb_after"),
                                   _median(ph["inprocess_c8"], "rss_mb_after")],
                  "RSS MB (all processes)", "rows: memory")  # fmt: skip
        elif name == "deployments":
            _deployments(top, bottom, fig_data)
        else:
            _soak(top, bottom, fig_data)
    fig.suptitle(f"issue 18's axes, {results['date']} @ {results['commit']} "
                 f"({results['machine']['cpus']} CPUs)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _deployments(top: Any, bottom: Any, data: dict[str, Any]) -> None:
    n = data["deployments_measured"]
    labels, rps, mem = [], [], []
    for layout, fig in data["layouts"].items():
        thr = fig["throughput"]["phases"]
        labels += [f"1 ({layout})", f"{n} ({layout})"]
        rps += [_median(thr["one"], "throughput_rps"), _median(thr["many"], "throughput_rps")]
        mem += [fig["single_deployment_memory"]["rss_mb_total"], fig["memory"]["rss_mb_total"]]
    _bars(top, labels, rps, "req/s at c64 on one deployment", "deployments: throughput")
    _bars(bottom, labels, mem, "RSS MB (all processes, idle)", "deployments: memory")
    bottom.axhline(1200, color="grey", ls="--", lw=0.8)
    for ax in (top, bottom):
        ax.tick_params(axis="x", labelsize=7)


def _soak(top: Any, bottom: Any, data: dict[str, Any]) -> None:
    series = data["latency_series"]
    ts = [b["t_s"] for b in series]
    rps = [b["rps"] for b in series]
    top.plot(ts, rps, color=RDV)
    top.set_ylabel("answers/s", color=RDV)
    top.set_ylim(0, max(rps, default=1.0) * 1.2 or 1.0)
    twin = top.twinx()
    twin.plot(ts, [b["p99_ms"] for b in series], color=BASE, lw=0.8)
    twin.set_ylabel("p99 ms (per bucket of send time)", color=BASE)
    twin.set_ylim(bottom=0)
    top.set_title(f"soak at {data['rate']:g} req/s: throughput, p99", fontsize=9)
    samples = data["samples"]
    st = [s["t_s"] for s in samples]
    bottom.plot(st, [s["rss_mb_total"] for s in samples], color=RDV, label="RSS, all processes")
    redis = [s["redis_used_memory_mb"] for s in samples]
    if any(v is not None for v in redis):
        bottom.plot(st, redis, color=BASE, label="Redis used_memory")
    bottom.set_ylabel("MB")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds")
    bottom.set_title("soak: memory", fontsize=9)
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.axvline(data["warmup_s"], color="grey", ls=":", lw=0.8)
