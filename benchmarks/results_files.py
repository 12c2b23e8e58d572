"""The files a run of ``benchmarks.run`` leaves: ``<out>/<date>-<commit>.json`` (every
figure), ``.md`` (the table) and ``.png`` (drawn by ``benchmarks.plot`` in the tools
environment), and with ``--update-readme`` the summary table in the top README between its
markers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.harness import log
from benchmarks.report_markdown import markdown, summary_markdown
from benchmarks.systems import REPO
from benchmarks.venvs import ensure_tools

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


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
