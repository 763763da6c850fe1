"""`python -m benchmarks.report`: every report in benchmarks/reports/ indexed in its README.md, with plots and provenance."""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import META_SUFFIX, REPORTS, figures_in

INDEX = "README.md"
NOT_RECORDED = "not recorded"


@dataclass
class Entry:
    """One report and what is known of how it was made (None: not recorded)."""

    name: str
    title: str
    command: str | None
    date: str | None
    machine: dict | None
    figures: list[str] = field(default_factory=list)
    data: str | None = None
    source: str = "metadata"    # "metadata": from NAME.meta.json; "recovered": read back from the .md/.json


def _header_field(text: str, label: str) -> str | None:
    """The value of a write_report header line such as "Date: 2026-11-22 06:46 UTC"."""
    m = re.search(rf"^{label}: (.+?)\s*$", text, re.MULTILINE)
    return m.group(1).strip().strip("`") if m else None


def recover(md: Path) -> Entry:
    """What a report written before NAME.meta.json existed still tells: title, header lines, its JSON's facts."""
    text = md.read_text()
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), md.stem)
    raw = md.with_suffix(".json")
    facts: dict = {}
    if raw.exists():
        try:
            loaded = json.loads(raw.read_text())
            facts = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            facts = {}
    machine = facts.get("machine") if isinstance(facts.get("machine"), dict) else None
    command = facts.get("command") or _header_field(text, "Command")
    return Entry(md.stem, title, command.strip() if command else None, _header_field(text, "Date"), machine,
                 figures_in(text), raw.name if raw.exists() else None, "recovered")


def load(md: Path) -> Entry:
    """The report's entry: from its metadata sidecar when there is one, else recovered."""
    meta = md.with_name(md.stem + META_SUFFIX)
    if not meta.exists():
        return recover(md)
    m = json.loads(meta.read_text())
    return Entry(m.get("name", md.stem), m.get("title", md.stem), m.get("command"), m.get("date"), m.get("machine"),
                 list(m.get("figures", [])), m.get("data"))


def collect(reports: Path) -> list[Entry]:
    """Every report (NAME.md, the index excepted) in the directory, by name."""
    return [load(md) for md in sorted(reports.glob("*.md")) if md.name != INDEX]


def _or_not(value) -> str:
    return NOT_RECORDED if value in (None, "") else str(value)


VERSIONS = ("python", "numpy", "torch", "cupy", "commit", "commit_dirty")
MACHINE = ("cpu", "cores", "platform")


def machine_line(machine: dict | None) -> str:
    """CPU, cores and platform, then any other fact a benchmark recorded (a GPU's name, say)."""
    if not machine:
        return NOT_RECORDED
    extra = [f"{k} {v}" for k, v in machine.items() if k not in VERSIONS + MACHINE]
    return ", ".join([f"{_or_not(machine.get('cpu'))}", f"{_or_not(machine.get('cores'))} cores",
                      f"{_or_not(machine.get('platform'))}", *extra])


def versions_line(machine: dict | None, recovered: bool = False) -> str:
    """Python, NumPy, PyTorch/CuPy where recorded, and the hpdl commit.

    write_report used to record torch whenever it was installed; it now does only when the
    benchmark imported it. A recovered report's torch may therefore be unused, and says so.
    """
    if not machine:
        return NOT_RECORDED
    parts = [f"python {_or_not(machine.get('python'))}", f"numpy {_or_not(machine.get('numpy'))}"]
    parts += [f"{k} {machine[k]}" + (" (installed; whether used not recorded)" if recovered and k == "torch" else "")
              for k in ("torch", "cupy") if machine.get(k)]
    commit = machine.get("commit")
    dirty = machine.get("commit_dirty")
    state = {True: " with uncommitted changes", False: ""}.get(dirty, "")
    parts.append(f"hpdl commit {commit}{state}" if commit else f"hpdl commit {NOT_RECORDED}")
    return ", ".join(parts)


def render(entries: list[Entry], reports: Path) -> str:
    """The index: per report its provenance table and its plots; then figures no report shows."""
    intro = ("Built by `python -m benchmarks.report` from the reports in this directory; each benchmark writes "
             "its own with `benchmarks/common.py:write_report`. Provenance marked *recovered* was read back "
             "from a report written before its metadata file existed; what it did not record says "
             f"\"{NOT_RECORDED}\".")
    lines = ["# Benchmark reports", "", intro, ""]
    lines += ["| report | command | date |", "|---|---|---|"]
    lines += [f"| [{e.title}]({e.name}.md) | `{_or_not(e.command)}` | {_or_not(e.date)} |" for e in entries]
    shown: set[str] = set()
    for e in entries:
        lines += ["", f"## [{e.title}]({e.name}.md)", "",
                  f"- Command: `{_or_not(e.command)}`" if e.command else f"- Command: {NOT_RECORDED}",
                  f"- Date: {_or_not(e.date)}",
                  f"- Machine: {machine_line(e.machine)}",
                  f"- Versions: {versions_line(e.machine, e.source == 'recovered')}",
                  "- Raw numbers: " + (f"[{e.data}]({e.data})" if e.data else NOT_RECORDED)]
        if e.source == "recovered":
            lines.append("- Provenance: *recovered* from the report itself (no metadata file)")
        for fig in e.figures:
            shown.add(fig)
            lines += ["", f"![{e.name}: {fig}]({fig})" if (reports / fig).exists() else f"(missing figure: {fig})"]
    orphans = sorted(p.name for p in reports.glob("*.png") if p.name not in shown)
    if orphans:
        lines += ["", "## Figures no report shows", "",
                  f"Command, machine and versions: {NOT_RECORDED}.", ""]
        lines += [f"![{name}]({name})" for name in orphans]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    ap.add_argument("--reports", type=Path, default=REPORTS, help="directory of the reports (NAME.md)")
    args = ap.parse_args(argv)
    if not args.reports.is_dir():
        print(f"benchmarks.report: error: {args.reports} is not a directory", file=sys.stderr)
        return 2
    try:
        entries = collect(args.reports)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        print(f"benchmarks.report: error: unreadable report metadata: {e}", file=sys.stderr)
        return 2
    out = args.reports / INDEX
    out.write_text(render(entries, args.reports))
    print(f"{out}: {len(entries)} reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
