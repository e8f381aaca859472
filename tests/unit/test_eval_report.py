"""`wmss eval report`: the side-by-side table, JSON and bar chart of several eval runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_wmss.evaluation.report import build_report, write_report
from megatron_wmss.platform.errors import UserError


def _run(path, label, tasks, limit=None):
    """A run directory as `wmss eval` writes it (summary.json is all the report reads)."""
    path.mkdir(parents=True)
    summary = {"label": label, "model": f"/models/{label}", "backend": "hf", "preset": "paper",
               "limit": limit, "tasks": {
                   name: {"metric": "pass@1" if name == "mbpp" else "exact_match",
                          "score": score, "n": n, "num_samples": 1, **extra}
                   for name, (score, n, extra) in tasks.items()}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs(tmp_path):
    return [_run(tmp_path / "sft", "sft", {"aime25": (0.2, 30, {}), "mbpp": (0.5, 10, {})}),
            _run(tmp_path / "wmss", "wmss", {"aime25": (0.3, 30, {}), "mbpp": (0.25, 10, {}),
                                             "amc23": (0.6, 40, {})}),
            _run(tmp_path / "again", "sft", {"aime25": (0.1, 30, {}), "mbpp": (1.0, 10, {})})]


def test_report_table_holds_every_runs_scores_side_by_side(runs, tmp_path):
    report = write_report(runs, tmp_path / "report")
    assert [r["label"] for r in report["runs"]] == ["sft", "wmss", "sft#2"]
    assert report["tasks"] == ["aime25", "mbpp", "amc23"]
    assert report["mean"]["tasks"] == ["aime25", "mbpp"]  # amc23: only one run has it
    assert report["mean"]["score"] == pytest.approx({"sft": 0.35, "wmss": 0.275, "sft#2": 0.55})
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| task | metric | sft | wmss | sft#2 |" in md
    assert "| aime25 | exact_match, n=30 | 20.0 | 30.0 | 10.0 |" in md
    assert "| mbpp | pass@1, n=10 | 50.0 | 25.0 | 100.0 |" in md
    assert "| amc23 | exact_match, n=40 | – | 60.0 | – |" in md
    assert "| **mean** | over aime25, mbpp | 35.0 | 27.5 | 55.0 |" in md
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["scores"]["amc23"] == {"wmss": {"metric": "exact_match", "score": 0.6,
                                                   "n": 40, "num_samples": 1}}
    assert on_disk == json.loads(json.dumps(report))


def test_report_flags_runs_over_different_problem_counts_and_shows_pass_at_k(tmp_path):
    runs = [_run(tmp_path / "a", "a", {"gsm8k": (0.5, 8, {"pass_at_k": {"1": 0.5, "4": 0.75}})},
                 limit=8),
            _run(tmp_path / "b", "b", {"gsm8k": (0.4, 10, {})})]
    write_report(runs, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| gsm8k | exact_match | 50.0 (n=8) | 40.0 (n=10) |" in md
    assert "| gsm8k | pass@4 | 75.0 | – |" in md
    assert "gsm8k: the runs scored different numbers of problems" in md


def test_report_png_bars_are_as_tall_as_the_scores(runs, tmp_path):
    from PIL import Image

    from megatron_wmss.evaluation.figures import scores_figure

    write_report(runs, tmp_path / "report")
    with Image.open(tmp_path / "report" / "report.png") as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 450
    ax = scores_figure(build_report(runs)).axes[0]
    bars = {container.get_label(): [(round(bar.get_x() + bar.get_width() / 2),
                                     round(bar.get_height(), 6)) for bar in container]
            for container in ax.containers}
    # (group, height in %); groups 0..3: aime25, mbpp, amc23 (wmss only), the mean over
    # aime25 and mbpp (the tasks every run has).
    assert bars == {"sft": [(0, 20.0), (1, 50.0), (3, 35.0)],
                    "wmss": [(0, 30.0), (1, 25.0), (2, 60.0), (3, 27.5)],
                    "sft#2": [(0, 10.0), (1, 100.0), (3, 55.0)]}
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == [
        "aime25", "mbpp", "amc23", "mean"]
    assert ax.get_ylim()[0] == 0 and 100 <= ax.get_ylim()[1] <= 110
    assert max(ax.get_yticks()) == 100  # a percentage axis: ticks 0..100
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert legend == ["sft", "wmss", "sft#2"]


def test_report_errors_name_the_bad_input(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is not a `wmss eval` run directory"):
        build_report([runs[0], tmp_path / "empty"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text('{"tasks": {"x": {}}}')
    with pytest.raises(UserError, match="not a summary written by `wmss eval`"):
        build_report([tmp_path / "broken"])
    write_report(runs, tmp_path / "r")
    done = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "eval", "report",
                           *map(str, runs), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "exists; pass --overwrite" in done.stderr
    done = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "eval", "report",
                           *map(str, runs), "--out", str(tmp_path / "r"), "--overwrite"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and f"wrote {tmp_path / 'r' / 'report.md'}" in done.stdout
