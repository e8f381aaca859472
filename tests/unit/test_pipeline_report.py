"""The verdicts of the ``wmss run`` report: WMSS against the SFT baseline and against the
temperature control, from the per-problem results each evaluation wrote, with a 95% interval.

The run directory is written by hand the way the stages leave it (completion markers, and each
evaluation's ``eval/predictions/<task>.jsonl``), so no model is trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_wmss.pipeline import load_pipeline
from megatron_wmss.pipeline.report import build_report, render_markdown
from megatron_wmss.platform.errors import UserError

REPO = Path(__file__).resolve().parents[2]
N = 60  # held-out problems
# Correct answers per (row, seed) as index ranges: WMSS well below the baseline in both seeds,
# level with the temperature control (one problem apart, in opposite directions).
CORRECT = {("wmss", 1): range(0, 20), ("wmss", 2): range(10, 40),
           ("sft_baseline", 1): range(0, 55), ("sft_baseline", 2): range(0, 58),
           ("temperature", 1): range(0, 21), ("temperature", 2): range(10, 39),
           ("sft_1epoch", 1): range(0, 5), ("sft_1epoch", 2): range(0, 6)}


def _write_eval(run: Path, stage: str, correct, ids=range(N)) -> None:
    rows = [{"doc_id": i, "prediction": "", "extracted": "", "correct": i in correct}
            for i in ids]
    predictions = run / stage / "eval" / "predictions"
    predictions.mkdir(parents=True)
    # Reversed rows: the report must pair problems by doc id.
    reverse = stage.endswith("wmss")
    (predictions / "local_math.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in (rows[::-1] if reverse else rows)))
    marker = run / "stages" / f"{stage}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    score = sum(r["correct"] for r in rows) / len(rows)
    marker.write_text(json.dumps({"stage": stage, "result": {
        "scores": {"local_math": score}, "n": {"local_math": len(rows)}}}))


@pytest.fixture
def run(tmp_path):
    (tmp_path / "base").mkdir()
    config = load_pipeline(str(REPO / "examples/demo/demo.yaml"),
                           [f"base={tmp_path / 'base'}", "seeds=2"], run_dir=str(tmp_path / "run"))
    for (label, seed), correct in CORRECT.items():
        stage = {"sft_baseline": "eval_baseline", "sft_1epoch": "eval_sft"}.get(
            label, f"eval_{label}")
        _write_eval(config.root, f"seed{seed}/{stage}", correct)
    _write_eval(config.root, "shared/eval_base", range(0))
    return config


def test_verdicts_carry_per_seed_differences_interval_method_and_wording(run):
    report = build_report(run)
    sft = report["verdict"]["wmss_vs_sft"]
    assert sft["per_seed"] == pytest.approx({"1": (20 - 55) / N, "2": (30 - 58) / N})
    assert sft["difference"] == pytest.approx(report["rows"]["wmss"]["mean"]
                                              - report["rows"]["sft_baseline"]["mean"])
    low, high = sft["interval"]
    assert low < sft["difference"] < high < 0
    assert sft["verdict"] == "lower" and sft["n_resamples"] == 10_000 and sft["level"] == 0.95
    assert sft["method"].startswith("paired bootstrap over seeds and problems")
    temperature = report["verdict"]["wmss_vs_temperature"]
    assert temperature["per_seed"] == pytest.approx({"1": -1 / N, "2": 1 / N})
    assert temperature["interval"][0] < 0 < temperature["interval"][1]
    assert temperature["verdict"] == "not resolved at 95%"
    markdown = render_markdown(report)
    assert "beat" not in markdown
    assert ("- **WMSS against SFT for 2 epochs: lower, -52.5 points, 95% interval "
            f"{100 * low:+.1f} to {100 * high:+.1f} (41.7% vs 94.2% held-out exact match, mean "
            "of 2 seeds; per seed -58.3, -46.7)**") in markdown
    assert ("- **WMSS against the temperature control CE(λ·z_strong): not resolved at 95%, "
            "+0.0 points, 95% interval " in markdown)
    assert "  - interval: paired bootstrap over seeds and problems" in markdown
    # Seeded: the same report every time (a resumed run must write the same report).
    assert build_report(run)["verdict"] == report["verdict"]


def test_missing_per_problem_results_fall_back_to_a_seed_bootstrap_and_say_so(run):
    (run.root / "seed2/eval_wmss/eval/predictions/local_math.jsonl").unlink()
    sft = build_report(run)["verdict"]["wmss_vs_sft"]
    assert sft["method"].startswith("bootstrap over seeds only (no per-problem results for "
                                    "local_math of seed 2)")
    assert sft["per_seed"] == pytest.approx({"1": (20 - 55) / N, "2": (30 - 58) / N})
    # Two seeds: the percentile interval of the resampled per-seed means spans both seeds.
    assert sft["interval"] == pytest.approx([(20 - 55) / N, (30 - 58) / N])
    assert sft["n_problems"] is None


def test_different_problems_in_one_seed_are_an_error_naming_the_task(run):
    stage = run.root / "seed1/eval_baseline"
    (stage / "eval/predictions/local_math.jsonl").unlink()
    (stage / "eval/predictions").rmdir()
    (run.root / "stages/seed1/eval_baseline.json").unlink()
    _write_eval(run.root, "seed1/eval_baseline", range(0, 55), ids=np.arange(1, N + 1).tolist())
    with pytest.raises(UserError, match=r"^task local_math: wmss seed 1 and sft_baseline seed 1 "
                                        r"scored different problems"):
        build_report(run)


def test_the_cost_table_sums_the_wmss_arm_and_divides_by_the_baseline(run):
    """The arm is phase 1, both entropy passes (M0's shared one counted in each seed),
    selection, joint training and extraction; controls and evaluation are not in it."""
    from megatron_wmss.pipeline.cost import build_cost, render_cost

    seconds = {"shared/entropy_m0": 4.0, "sft": 10.0, "entropy_m1": 3.0, "select1": 1.0,
               "joint1": 12.0, "extract1": 2.0, "baseline": 20.0, "temperature": 99.0,
               "eval_wmss": 99.0}
    for seed in (1, 2):
        for name, value in seconds.items():
            stage = name if name.startswith("shared/") else f"seed{seed}/{name}"
            marker = run.root / "stages" / f"{stage}.json"
            record = json.loads(marker.read_text()) if marker.is_file() else {"result": {}}
            shared = name.startswith("shared/")
            record["cost"] = {"seconds": value if shared else value * seed, "tokens": 100}
            if name == "joint1":  # what run_stages records: every rank's peak
                record["cost"].update(peak_bytes=[3 * 2**30, 2**29 * seed],
                                      peak_measure="rss_growth")
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(record))
    for seed, fraction in ((1, 0.5), (2, 0.25)):
        select = run.root / "stages" / f"seed{seed}" / "select1.json"
        select.write_text(json.dumps({"result": {"fraction_kept": fraction},
                                      "cost": {"seconds": 1.0 * seed}}))
    cost = build_cost(run)
    one, two = cost["seeds"]["1"], cost["seeds"]["2"]
    assert one["seconds"] == {"phase 1": 10.0, "entropy": 7.0, "selection": 1.0, "joint": 12.0,
                              "extraction": 2.0}
    assert one["wmss_seconds"] == 32.0 and one["ratio"] == 32.0 / 20.0
    # Seed 2's own stages take twice as long; the shared M0 pass is the same 4 s.
    assert two["wmss_seconds"] == 4.0 + 2 * 28.0 and two["ratio"] == 60.0 / 40.0
    assert cost["mean_ratio"] == pytest.approx((1.6 + 1.5) / 2)
    text = render_cost(cost)
    assert "| 1 | 10.0 | 7.0 | 1.0 | 12.0 | 2.0 | 32.0 | 20.0 | 1.60x |" in text
    # Per seed (3 + 2 + 6a) / 6 for its own active fraction a, then the mean.
    assert cost["predicted_ratio"] == pytest.approx((8 / 6 + 6.5 / 6) / 2)
    assert "Measured ratio (mean over seeds): 1.55x; `wmss plan`'s prediction" in text
    assert "1.21x (`wmss plan CONFIG --active-fraction 0.38` prints the same)" in text
    assert cost["active_fraction"] == pytest.approx(0.375)
    # Peak memory per stage: the largest rank, then each rank.
    assert "| seed2/joint1 | 3.00 | 3.00 / 1.00 |" in text
    assert "growth of the peak RSS over the stage's start" in text
    assert set(cost["peak_memory"]) == {"seed1/joint1", "seed2/joint1"}


def test_the_predicted_cost_ratio_counts_flops_per_stage():
    from megatron_wmss.pipeline.cost import predicted_cost_ratio

    assert predicted_cost_ratio(1, [0.56]) == pytest.approx((3 + 2 + 6 * 0.56) / 6)
    assert predicted_cost_ratio(1, [0.56], freeze_weak=True) == pytest.approx(
        (3 + 2 + 4 * 0.56) / 6)
    # Two rounds: phase 1, three entropy passes, two joint rounds, against 3 SFT epochs.
    assert predicted_cost_ratio(2, [0.5, 0.25]) == pytest.approx((3 + 3 + 6 * 0.75) / 9)
