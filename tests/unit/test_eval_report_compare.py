"""`wmss eval report --baseline`: each run's difference to the baseline per task, with a 95%
interval from the per-problem results (paired on doc ids) and the verdict it gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_wmss.evaluation.report import build_report, write_report
from megatron_wmss.platform.errors import UserError

N = 40


def _run(path, label, correct: dict[str, set], ids=range(N), reverse=False):
    """A run directory as `wmss eval` writes it: summary.json and predictions/<task>.jsonl."""
    (path / "predictions").mkdir(parents=True)
    tasks = {}
    for task, right in correct.items():
        rows = [{"doc_id": i, "prediction": "", "extracted": "", "correct": i in right}
                for i in ids]
        (path / "predictions" / f"{task}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in (rows[::-1] if reverse else rows)))
        tasks[task] = {"metric": "exact_match", "n": len(rows), "num_samples": 1,
                       "score": sum(r["correct"] for r in rows) / len(rows)}
    (path / "summary.json").write_text(json.dumps(
        {"label": label, "model": f"/m/{label}", "backend": "hf", "preset": "paper",
         "limit": None, "tasks": tasks}))
    return path


@pytest.fixture
def runs(tmp_path):
    return {"sft": _run(tmp_path / "sft", "sft", {"gsm8k": set(range(10)),
                                                   "aime25": set(range(20))}),
            # 20 more right on gsm8k; one more right and one more wrong on aime25.
            "wmss": _run(tmp_path / "wmss", "wmss", {"gsm8k": set(range(30)),
                                                      "aime25": set(range(1, 20)) | {25}}),
            # The baseline's own answers, rows in reverse order.
            "again": _run(tmp_path / "again", "again", {"gsm8k": set(range(10))}, reverse=True)}


def test_each_run_against_the_baseline_per_task(runs, tmp_path):
    report = write_report([runs["sft"], runs["wmss"], runs["again"]], tmp_path / "r",
                          baseline=runs["sft"])
    assert report["baseline"] == "sft" and [r["label"] for r in report["runs"]] == \
        ["sft", "wmss", "again"]
    gsm8k = report["comparisons"]["gsm8k"]["wmss"]
    assert gsm8k["difference"] == pytest.approx(0.5)
    assert 0 < gsm8k["interval"][0] < 0.5 < gsm8k["interval"][1]
    assert gsm8k["verdict"] == "higher" and gsm8k["n_resamples"] == 10_000
    assert gsm8k["method"].startswith("paired bootstrap over problems only")
    assert gsm8k["n_problems"] == N
    aime = report["comparisons"]["aime25"]["wmss"]
    assert aime["difference"] == 0.0 and aime["verdict"] == "not resolved at 95%"
    # The baseline's answers in another row order: paired by doc id, no difference at all.
    again = report["comparisons"]["gsm8k"]["again"]
    assert (again["difference"], again["interval"]) == (0.0, [0.0, 0.0])
    assert "again" not in report["comparisons"]["aime25"]  # it has no aime25
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["comparisons"] == json.loads(json.dumps(report["comparisons"]))
    md = (tmp_path / "r" / "report.md").read_text()
    low, high = (100 * v for v in gsm8k["interval"])
    assert f"| gsm8k | wmss | +50.0 | {low:+.1f} to {high:+.1f} | higher |" in md
    assert "| gsm8k | again | +0.0 | +0.0 to +0.0 | not resolved at 95% |" in md
    assert "| aime25 | wmss | +0.0 |" in md and "Interval: paired bootstrap over problems" in md
    assert "beat" not in md


def test_a_baseline_outside_the_run_list_comes_first(runs):
    report = build_report([runs["wmss"]], baseline=runs["sft"])
    assert [r["label"] for r in report["runs"]] == ["sft", "wmss"]
    assert report["comparisons"]["gsm8k"]["wmss"]["verdict"] == "higher"
    assert "comparisons" not in build_report([runs["sft"], runs["wmss"]])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "eval", "report",
                           *map(str, args)], capture_output=True, text=True)


def test_different_doc_ids_are_a_one_line_error_naming_the_task(runs, tmp_path):
    shifted = _run(tmp_path / "shifted", "shifted", {"gsm8k": set(range(10))},
                   ids=range(5, N + 5))
    done = _cli(runs["sft"], shifted, "--baseline", runs["sft"], "--out", tmp_path / "r")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("wmss eval report: error: task gsm8k: shifted and sft scored "
                                  "different problems (5 doc ids only in shifted")
    assert not (tmp_path / "r").exists()
    (runs["wmss"] / "predictions" / "aime25.jsonl").unlink()
    with pytest.raises(UserError, match=r"^task aime25: run wmss .* has no "
                                        r"predictions/aime25.jsonl"):
        build_report([runs["sft"], runs["wmss"]], baseline=runs["sft"])
