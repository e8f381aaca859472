"""``wmss run`` end to end on a tiny model and the shipped tiny data: every stage, the report,
a SIGKILL in the middle of a stage followed by a rerun, and SIGKILLs at seeded random moments
each followed by a rerun (tests/kills.py), all of which must end with the same report as a run
that went straight through.

References are independent of the code under test where they can be: step counts follow from
the data size and the batch (1 epoch per phase, the baseline 2, phase 3 over the selection's
unique samples), the report's scores are the ones `wmss eval` wrote for the extracted model,
and the killed run is compared with a separate uninterrupted run in another directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLES, GLOBAL_BATCH = 64, 16
KILLS, KILL_SEED = 3, 0  # the random kills below; bench/kill_soak.py runs 50


def _wmss(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_wmss.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def build_tiny_run(root: Path) -> Path:
    """The tiny data, eval set and base model under ``root``; returns the `wmss run` config
    (run directory ``root/run``). Also used by bench/kill_soak.py."""
    rows = [json.loads(line) for line in
            (REPO / "examples/data/tiny_sft.jsonl").read_text().splitlines()][:SAMPLES]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval").mkdir()
    (root / "eval" / "local_math.jsonl").write_text("".join(
        json.dumps({"question": r["prompt"], "answer": r["completion"].split("boxed{")[1][:-2]})
        + "\n" for r in rows[:6]))
    tokenizer = str(REPO / "examples/data/tiny_sp.model")
    # The base model M0: a few SFT steps from random weights.
    _finish(_wmss("sft", "--config", REPO / "examples/recipes/tiny-sft.yaml",
                  f"data.paths=[{data}]", "trainer.train_steps=3", "trainer.progress_bar=false",
                  "trainer.tensorboard=false", "--run-dir", root / "base"))
    config = {
        "run_dir": str(root / "run"), "base": str(root / "base" / "checkpoints"), "seeds": [7],
        "training": {
            "optim": {"lr": 3e-3, "warmup_fraction": 0.1},
            "data": {"paths": [str(data)], "max_length": 96, "micro_batch_size": 8},
            "tokenizer": {"path": tokenizer},
            "trainer": {"global_batch_size": GLOBAL_BATCH, "keep_last": 1, "log_interval": 1,
                        "tensorboard": False, "progress_bar": False}},
        # A checkpoint after each joint step: the kill below lands between two of them.
        "joint": {"mix": {"mix_lambda": 0.5}, "trainer": {"save_interval": 1}},
        "entropy": {"micro_batch_size": 16, "shard_size": 16},
        "eval": {"tasks": ["local_math"], "data_dir": str(root / "eval"), "max_new_tokens": 12,
                 "generate_batch_size": 8},
        "controls": ["temperature"],
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return root, build_tiny_run(root)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """The run straight through: (its output, its wall clock in s)."""
    root, config = setup
    start = time.monotonic()
    out = _finish(_wmss("run", config))
    return out, time.monotonic() - start


def _steps(run: Path, stage: str) -> int:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["step"]


def _report(run: Path) -> tuple[dict, str]:
    """What a resumed run must reproduce: report.json (less the config, which names the run
    directory), report.md, and every training stage's loss at every step (the report alone
    holds only the scores and final losses: a joint stage resumed at the wrong data position
    would pass unseen)."""
    report = json.loads((run / "report" / "report.json").read_text())
    report.pop("config")
    losses = {}
    for metrics in sorted(run.glob("seed*/*/metrics.jsonl")):
        by_step = {}
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                by_step[record["step"]] = record["loss"]  # a resumed step: its last log
        losses[str(metrics.parent.relative_to(run))] = by_step
    report["training_losses"] = losses
    return report, (run / "report" / "report.md").read_text()


def test_run_then_sigkill_inside_joint_training_and_rerun_gives_the_same_report(
        setup, uninterrupted, capsys):
    root, config = setup
    out, _ = uninterrupted
    run = root / "run"
    assert f"wmss run: report {run}/report/report.md" in out
    per_epoch = SAMPLES // GLOBAL_BATCH
    assert _steps(run, "seed7/sft") == per_epoch
    assert _steps(run, "seed7/baseline") == 2 * per_epoch
    selected = json.loads((run / "stages/seed7/select1.json").read_text())["result"]
    assert 0 < selected["unique_kept"] < SAMPLES
    assert _steps(run, "seed7/joint1") == selected["unique_kept"] // GLOBAL_BATCH
    assert _steps(run, "seed7/temperature") == selected["unique_kept"] // GLOBAL_BATCH
    assert (run / "seed7/extract1/model/metadata.json").is_file()
    report, markdown = _report(run)
    for label, stage in (("wmss", "seed7/eval_wmss"), ("sft_baseline", "seed7/eval_baseline"),
                         ("temperature", "seed7/eval_temperature"),
                         ("sft_1epoch", "seed7/eval_sft"), ("base", "shared/eval_base")):
        written = json.loads((run / stage / "eval" / "summary.json").read_text())
        key = "shared" if label == "base" else "7"
        assert report["rows"][label]["per_seed"][key]["scores"]["local_math"] == \
            written["tasks"]["local_math"]["score"]
    wmss_eval = json.loads((run / "seed7/eval_wmss/eval/summary.json").read_text())
    assert wmss_eval["model"] == str(run / "seed7/extract1/model")  # the extracted model
    assert "wmss_vs_sft" in report["verdict"] and "wmss_vs_temperature" in report["verdict"]
    for item in report["verdict"].values():  # one seed: worded from an interval over problems
        assert item["verdict"] in ("higher", "lower", "not resolved at 95%")
        assert item["method"].startswith("paired bootstrap over problems only")
        assert item["n_problems"] == 6 and item["text"] in markdown
    assert "| WMSS |" in markdown and "| SFT, same epochs |" in markdown
    for png in ("loss.png", "diagnostics.png", "selection_weights_seed7.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The cost table: every stage of the arm and the baseline timed, their tokens counted.
    cost = json.loads((run / "report" / "cost.json").read_text())
    seed = cost["seeds"]["7"]
    assert all(v > 0 for k, v in seed["seconds"].items() if k != "selection")
    assert seed["ratio"] == seed["wmss_seconds"] / seed["baseline_seconds"] > 0
    per_epoch_tokens = seed["baseline_tokens"] / 2
    # phase 1 (one epoch) + two entropy passes over every row + joint training on a subset
    assert 2.5 * per_epoch_tokens < seed["wmss_tokens"] < 4.5 * per_epoch_tokens
    assert "| 7 |" in (run / "report" / "cost.md").read_text()
    # The SFT metrics carry the saturation diagnostics the plots show.
    assert "model/margin" in (run / "seed7/baseline/metrics.jsonl").read_text()

    # A finished run: every stage is skipped (no stage needs megatron-core to be skipped, so
    # this runs here, in the test process), and the report comes out the same.
    from megatron_wmss.pipeline import load_pipeline
    from megatron_wmss.pipeline.report import write_report
    from megatron_wmss.pipeline.stages import plan_stages, run_stages

    loaded = load_pipeline(str(config))
    stages = plan_stages(loaded)
    capsys.readouterr()
    assert run_stages(loaded, stages) == 0
    assert capsys.readouterr().err.count("done, skipped") == len(stages)
    write_report(loaded)
    assert _report(run) == (report, markdown)

    # SIGKILL between two checkpoints of phase 3, then the same command again.
    killed = root / "killed"
    proc = _wmss("run", config, "--run-dir", killed, start_new_session=True)
    first = killed / "seed7/joint1/checkpoints/iter_0000001"
    deadline = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its joint stage saved a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed / "stages/seed7/joint1.json").exists()
    out = _finish(_wmss("run", config, "--run-dir", killed))
    assert "seed7/sft (sft): done, skipped" in out
    assert "resuming from" in out  # the joint stage continued from its checkpoint
    assert _report(killed) == (report, markdown)


def test_sigkill_at_random_moments_then_rerun_gives_the_same_report(setup, uninterrupted,
                                                                     tmp_path):
    from tests.kills import describe, failures, kill_rounds

    root, config = setup
    _, duration = uninterrupted
    want = _report(root / "run")
    # Each attempt killed at a moment uniform over the uninterrupted run's wall clock, so the
    # kills land in any stage (startup, tokenization, entropy, selection, training, a save,
    # extraction, eval, the report); a rerun after the run has finished starts a new run
    # directory (tests/kills.py), so all KILLS are real kills.
    for round_, attempts in kill_rounds(
            lambda r: [sys.executable, "-m", "megatron_wmss.cli", "run", str(config),
                       "--run-dir", str(tmp_path / f"run{r}")],
            duration=duration, kills=KILLS, seed=KILL_SEED, log_dir=tmp_path / "logs"):
        story = f"uninterrupted {duration:.1f} s; round {round_}: {describe(attempts)}"
        print(story)
        assert not failures(attempts), story
        assert _report(tmp_path / f"run{round_}") == want, story
