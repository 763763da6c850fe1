"""What every benchmark shares: machine facts, alternating timed runs, and report writing."""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPORTS = Path(__file__).resolve().parent / "reports"
ROOT = REPORTS.parent.parent
# NAME.meta.json beside each report: what benchmarks.report indexes.
META_SUFFIX = ".meta.json"


def machine() -> dict:
    """The facts a reader needs to compare a figure with their own machine."""
    import numpy as np
    facts = {"python": platform.python_version(), "numpy": np.__version__,
             "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    if "torch" in sys.modules:  # only a benchmark that uses PyTorch reports its version
        facts["torch"] = sys.modules["torch"].__version__
    try:
        git = ["git", "-C", str(ROOT)]
        facts["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True, check=True).stdout.strip()
        # A figure made from uncommitted code is not reproducible from the commit alone; the
        # reports themselves (this run's outputs among them) are not code.
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  f":(exclude){REPORTS.relative_to(ROOT)}"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        facts["commit_dirty"] = bool(changed)
    except (OSError, subprocess.CalledProcessError):
        pass
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def alternate(runs: dict[str, Callable[[], float]], repeats: int = 3) -> dict[str, list[float]]:
    """Call each run in turn (A B A B ...) so drifting machine load hits all of them alike."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], None], n: int) -> float:
    """Calls per second of fn over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(c) -> str:
    return f"{c:.3g}" if isinstance(c, float) else str(c)


def grouped_bars(path: Path, names: list[str], series: dict[str, list[float]], ylabel: str,
                 log: bool = False, rotate: bool = False) -> None:
    """A bar chart, saved to `path`: a group of bars per name, one bar per series in each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = range(len(names))
    width = 0.76 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names)) if rotate else 5.0, 3.4))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], values, width, label=label)
    ax.set_xticks(list(xs), names, **({"rotation": 30, "ha": "right"} if rotate else {}))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures_in(markdown: str) -> list[str]:
    """The local images a markdown text shows (![alt](file.png)), in order, once each."""
    found = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown)
    return list(dict.fromkeys(f for f in found if "://" not in f))


def write_report(name: str, title: str, body: str, data: dict, reports: Path | None = None) -> Path:
    """benchmarks/reports/NAME.md (with the machine and command), NAME.json (raw numbers) and
    NAME.meta.json (title, command, machine, date and figures, for `python -m benchmarks.report`)."""
    reports = REPORTS if reports is None else reports
    reports.mkdir(parents=True, exist_ok=True)
    facts = machine()
    command = ("python -m benchmarks." + name + " " + " ".join(sys.argv[1:])).strip()
    date = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    header = f"# {title}\n\nCommand: `{command}`  \nMachine: " + ", ".join(
        f"{k} {v}" for k, v in facts.items()) + f"  \nDate: {date}\n\n"
    path = reports / f"{name}.md"
    path.write_text(header + body.rstrip() + "\n")
    (reports / f"{name}.json").write_text(json.dumps({"machine": facts, "command": command, **data}, indent=1))
    meta = {"name": name, "title": title, "command": command, "machine": facts, "date": date,
            "report": path.name, "data": f"{name}.json", "figures": figures_in(body)}
    (reports / f"{name}{META_SUFFIX}").write_text(json.dumps(meta, indent=1))
    return path
