"""The benchmark index: built from reports with metadata, recovered from older ones, "not recorded" where nothing is."""
from __future__ import annotations

import json

from benchmarks import report
from benchmarks.common import write_report

MACHINE = {"python": "3.11.7", "numpy": "2.4.6", "cpu": "Test CPU 9000", "cores": 2, "platform": "Linux-x",
           "commit": "abc1234", "commit_dirty": False}


def fake_reports(tmp_path):
    """A report written by write_report, one from before the metadata file, and a bare markdown file."""
    (tmp_path / "speed.png").write_bytes(b"png")
    (tmp_path / "stray.png").write_bytes(b"png")
    write_report("speed", "Speed of things", "Fast.\n\n![speed](speed.png)\n", {"x": 1}, reports=tmp_path)
    (tmp_path / "old.md").write_text("# An old report\n\nCommand: `python -m benchmarks.old --n 3`  \n"
                                     "Machine: whatever  \nDate: 2026-11-22 06:46 UTC\n\n![old](old.png)\n")
    (tmp_path / "old.json").write_text(json.dumps({"machine": MACHINE, "command": "python -m benchmarks.old --n 3",
                                                   "rows": []}))
    (tmp_path / "bare.md").write_text("# Bare notes\n\nNo header at all.\n")
    return tmp_path


def test_index_lists_every_report_with_its_provenance_and_plots(tmp_path):
    """Metadata reports give command, machine, versions and figures; old ones what their files still hold."""
    reports = fake_reports(tmp_path)
    assert report.main(["--reports", str(reports)]) == 0
    index = (reports / "README.md").read_text()
    speed, old, bare = (index.index(f"## [{t}]") for t in ("Speed of things", "An old report", "Bare notes"))
    # the new report: machine and versions of this interpreter, its figure shown
    section = index[speed:]
    assert "![speed: speed.png](speed.png)" in section
    assert "cores" in section.split("\n## ")[0] and "python " in section.split("\n## ")[0]
    # the old report: its JSON's machine and command, its header's date, marked recovered; its missing figure named
    section = index[old:].split("\n## ")[0]
    assert "Test CPU 9000, 2 cores" in section
    assert "hpdl commit abc1234" in section and "python 3.11.7, numpy 2.4.6" in section
    assert "`python -m benchmarks.old --n 3`" in section and "2026-11-22 06:46 UTC" in section
    assert "*recovered*" in section and "(missing figure: old.png)" in section
    # the bare file: nothing invented
    section = index[bare:].split("\n## ")[0]
    assert section.count("not recorded") == 5    # command, date, machine, versions, raw numbers
    # a figure no report shows is still gathered, without a made-up provenance
    assert "![stray.png](stray.png)" in index.split("## Figures no report shows")[1]
    assert "speed.png" not in index.split("## Figures no report shows")[1]


def test_write_report_sidecar_records_command_machine_and_figures(tmp_path):
    """write_report keeps NAME.md and NAME.json as before and adds NAME.meta.json with the provenance."""
    write_report("demo", "Demo", "![a](a.png) and ![b](b.png)", {"v": [1, 2]}, reports=tmp_path)
    meta = json.loads((tmp_path / "demo.meta.json").read_text())
    raw = json.loads((tmp_path / "demo.json").read_text())
    assert meta["figures"] == ["a.png", "b.png"]
    assert meta["command"].startswith("python -m benchmarks.demo")
    assert {"python", "numpy", "cpu", "cores"} <= set(meta["machine"])
    assert raw["v"] == [1, 2] and raw["machine"] == meta["machine"]
    assert (tmp_path / "demo.md").read_text().startswith("# Demo\n\nCommand: `python -m benchmarks.demo")


def test_missing_directory_is_a_one_line_error(tmp_path, capsys):
    assert report.main(["--reports", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
