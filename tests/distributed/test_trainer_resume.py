"""`wmss sft` / `wmss joint` end to end: kill and resume, reshard, SIGUSR1, metrics, non-finite.

Every run is the real command line (`python -m megatron_wmss.cli ... --nproc-per-node 2`) on the
shipped tiny recipes, shortened to 12 optimizer steps with a checkpoint every 3. CPU with gloo
is deterministic, so a resumed run must reproduce the uninterrupted run's loss at every step
exactly; a run resumed at another layout sums in another order, so there the losses agree to a
stated tolerance instead.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "examples" / "recipes"
STEPS, SAVE_EVERY = 12, 3
SHORT = [f"trainer.train_steps={STEPS}", f"trainer.save_interval={SAVE_EVERY}",
         "trainer.progress_bar=false", "trainer.keep_last=10"]
# Dropout in the joint runs: their SIGKILL tests below then reproduce every loss only when the
# resume restores each rank's RNG streams (checked: without the restore they fail).
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
LAYOUTS = {
    "tp2-sft": ("sft", ["parallel.tensor_model_parallel_size=2"]),
    # λ ramps over the first 6 steps: a resume that restarted the schedule would show.
    "pp2-joint": ("joint", ["parallel.pipeline_model_parallel_size=2",
                            "data.pad_to_max_length=true", "mix.lambda_start=0.9",
                            "mix.lambda_ramp_steps=6", *DROPOUT]),
    # What CUDA runs default to: sharded optimizer state, both communication overlaps.
    "dp2-distopt-joint": ("joint", ["memory.distributed_optimizer=true",
                                    "memory.overlap_grad_reduce=true",
                                    "memory.overlap_param_gather=true", *DROPOUT]),
}
# `wmss sft` as a long CUDA run would have it: packed rows, sharded optimizer state, dropout
# (DP=2 on the local layer spec, so micro_batch_size stays the recipe's; TE's THD path alone
# needs 1). Killed at random wall-clock moments below, not only between steps.
PACKED_SFT = ["data.pack_sequences=true", "memory.distributed_optimizer=true", *DROPOUT]
KILLS, KILL_SEED = 3, 0
# Another layout adds the same fp32 terms in another order (TP partial sums, DP all-reduce,
# vocab padding 384 vs 512 rows, pipeline p2p). Measured over the 6 resumed steps: at most
# 4.2e-8 relative; 1e-5 leaves 200x, while a lost optimizer state or a wrong data position
# moves the loss by > 1e-2.
RESHARD_RTOL = 1e-5
pytestmark = pytest.mark.slow


def _command(command: str, run_dir: Path, overrides) -> list[str]:
    return [sys.executable, "-m", "megatron_wmss.cli", command, "--config",
            str(RECIPES / f"tiny-{command}.yaml"), "--run-dir", str(run_dir),
            "--nproc-per-node", "2", *SHORT, *overrides]


def _start(command, run_dir, overrides) -> subprocess.Popen:
    # Its own process group, so that a kill reaches the ranks it spawned too.
    return subprocess.Popen(_command(command, run_dir, overrides), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(command, run_dir, overrides, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(command, run_dir, overrides), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written right now
    return out


def _losses(run_dir: Path) -> list[float]:
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), run_dir
    return [r["loss"] for r in records]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if records and records[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """layout -> run directory of the uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, (command, overrides) in LAYOUTS.items():
        proc = _run(command, root / name, overrides)
        assert proc.returncode == 0, proc.stderr
        out[name] = root / name
    return out


# The joint layouts only: SFT resumes through the same trainer code and state (the tp2-sft
# run is still the reference of the SIGUSR1 and re-layout tests below), and `wmss run`'s own
# test (tests/slow/test_pipeline.py) kills a pipeline inside a training stage too.
@pytest.mark.parametrize("layout", ["pp2-joint", "dp2-distopt-joint"])
def test_sigkill_at_a_random_step_then_rerun_reproduces_every_loss(references, layout,
                                                                   tmp_path):
    command, overrides = LAYOUTS[layout]
    kill_at = random.Random(layout).randint(4, STEPS - 2)
    run_dir = tmp_path / "run"
    proc = _start(command, run_dir, overrides)
    _wait_for_step(proc, run_dir, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    rerun = _run(command, run_dir, overrides)
    assert rerun.returncode == 0, rerun.stderr
    assert _losses(run_dir) == _losses(references[layout]), f"killed at step {kill_at}"


@pytest.mark.parametrize("to_layout", [
    ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
     "data.pad_to_max_length=true"],
    ["parallel.tensor_model_parallel_size=1"],  # DP=2
], ids=["tp1-pp2", "tp1-dp2"])
def test_resume_at_another_layout_continues_the_loss(references, to_layout, tmp_path):
    source = references["tp2-sft"]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "iter_0000006",
                    run_dir / "checkpoints" / "iter_0000006")
    proc = _run("sft", run_dir, to_layout)
    assert proc.returncode == 0, proc.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(7, STEPS + 1))
    want = _losses(source)[6:]
    worst = max(abs(r["loss"] - loss) / abs(loss) for r, loss in zip(records, want))
    print(f"resumed at {to_layout}: largest relative loss difference {worst:.2e}")
    for record, loss in zip(records, want):
        assert record["loss"] == pytest.approx(loss, rel=RESHARD_RTOL), record["step"]


def test_sigusr1_saves_and_exits_with_the_requeue_code(references, tmp_path):
    from megatron_wmss.training.signals import PREEMPTION_EXIT_CODE

    command, overrides = LAYOUTS["tp2-sft"]
    run_dir = tmp_path / "run"
    proc = _start(command, run_dir, overrides)
    _wait_for_step(proc, run_dir, 4)
    os.kill(proc.pid, signal.SIGUSR1)  # the launcher forwards it to its ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTION_EXIT_CODE, err
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
    stopped = _records(run_dir)[-1]["step"]
    assert latest["step"] == stopped < STEPS
    marker = json.loads((run_dir / "preempted.json").read_text())  # for torchrun users
    assert marker["step"] == stopped and marker["exit_code"] == PREEMPTION_EXIT_CODE
    assert (run_dir / "checkpoints" / latest["checkpoint"] / "train_state.json").is_file()
    # The losses so far are the uninterrupted run's. That the resumed run then ends on the
    # same losses is checked through Slurm (tests/slow/test_slurm_launch.py: USR1, requeue,
    # resume) and after SIGKILL above, each from a checkpoint like this one.
    want = _losses(references["tp2-sft"])
    assert [r["loss"] for r in _records(run_dir)] == want[:stopped]


def test_metrics_and_tensorboard_hold_losses_norms_and_diagnostics(references):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = references["pp2-joint"]
    records = _records(run_dir)
    for record in records:
        for key in ("loss", "lr", "grad_norm", "grad_norm/strong", "grad_norm/weak",
                    "tokens_per_s", "mix_lambda", "strong/entropy", "weak/target_prob",
                    "mixed/margin", "mixed/logit_std", "update_norm/strong",
                    "param_norm/strong", "update_ratio/strong"):
            assert key in record, key
        # The two models' norms are the parts of the total one, and both models train.
        total = (record["grad_norm/strong"] ** 2 + record["grad_norm/weak"] ** 2) ** 0.5
        assert total == pytest.approx(record["grad_norm"], rel=1e-5)
        assert record["grad_norm/weak"] > 0 and record["grad_norm/strong"] > 0
        assert record["grad_norm/weak"] != record["grad_norm/strong"]
        assert record["tokens_per_s"] > 0
    # The λ ramp: 0.9 at step 1, linear to 0.5 at step 7, then constant.
    lambdas = [r["mix_lambda"] for r in records]
    assert lambdas[0] == pytest.approx(0.9) and lambdas[6:] == [0.5] * (STEPS - 6)
    assert all(a > b for a, b in zip(lambdas[:6], lambdas[1:7]))
    # Two different models: their diagnostics differ, and the mix's lie between theirs.
    for r in records:
        low, high = sorted((r["strong/entropy"], r["weak/entropy"]))
        assert low < high and r["mixed/logit_std"] > 0
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm/strong", "grad_norm/weak", "tokens_per_s",
            "strong/entropy", "mixed/margin"} <= tags
    tb_losses = [e.value for e in events.Scalars("loss")]
    assert tb_losses == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert json.loads((run_dir / "checkpoints" / "latest").read_text())["step"] == STEPS
    assert (run_dir / "config.yaml").is_file()


def test_non_finite_steps_are_skipped_then_stop_the_run_with_a_marked_checkpoint(tmp_path):
    # lr 1e30: the first update sends the weights to ~1e30, after which every loss is inf/nan.
    run_dir = tmp_path / "run"
    proc = _run("sft", run_dir, ["optim.lr=1e30", "optim.warmup_fraction=0",
                                 "trainer.save_interval=1", "trainer.max_nonfinite_steps=2"])
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    # The step, and what was not finite: the loss and/or the model's gradient norm.
    assert message.startswith("wmss sft: error: step 3: ") and "model" in message, message
    assert "not finite for 2 steps in a row" in message
    records = _records(run_dir)
    assert [r["skipped"] for r in records] == [False, True, True]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "iter_0000003-nonfinite" / "train_state.json").is_file()
    # The last good checkpoint stays the one a rerun resumes from.
    assert json.loads((checkpoints / "latest").read_text())["checkpoint"] == "iter_0000001"


def test_torchrun_launches_one_rank_per_process(tmp_path):
    # The per-rank program under torchrun (RANK/WORLD_SIZE/MASTER_* from its environment).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "megatron_wmss.cli",
           "sft",
           "--config", str(RECIPES / "tiny-sft.yaml"), "--run-dir", str(run_dir),
           "trainer.train_steps=3", "trainer.progress_bar=false", "trainer.save_interval=1",
           "trainer.keep_last=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads((run_dir / "checkpoints" / "latest").read_text())["step"] == 3
    # keep_last=2: the oldest of the three checkpoints is gone.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "iter_0000002", "iter_0000003", "latest"]


def test_the_wall_clock_limit_saves_and_exits_with_the_requeue_code(tmp_path):
    from megatron_wmss.training.signals import PREEMPTION_EXIT_CODE

    # 0.001 minutes from process start have passed by the first step: save after it, exit.
    run_dir = tmp_path / "run"
    proc = _run("sft", run_dir, ["trainer.exit_duration_minutes=0.001"])
    assert proc.returncode == PREEMPTION_EXIT_CODE, proc.stderr
    assert "time limit" in proc.stdout
    assert json.loads((run_dir / "checkpoints" / "latest").read_text())["step"] == 1


def test_training_checkpoints_serve_as_init_and_export(references, tmp_path):
    """Phase 1's checkpoint starts phase 3 (strong from it, weak from its first checkpoint)
    and exports to Hugging Face as any model checkpoint does."""
    source = references["tp2-sft"] / "checkpoints"
    run_dir = tmp_path / "joint"
    proc = _run("joint", run_dir, [f"init.strong={source / 'iter_0000012'}",
                                   f"init.weak={source / 'iter_0000003'}",
                                   "trainer.train_steps=2"])
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in _records(run_dir)] == [1, 2]
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "export-hf", "--ckpt",
                           str(run_dir / "checkpoints" / "iter_0000002"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_resuming_with_a_changed_recipe_is_refused_in_one_line(references, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(references["tp2-sft"], run_dir)
    # The reported bug: packing switched on with train_steps set (same total steps), where
    # consumed_samples would have been read as packed rows. Each field of the key is refused
    # in this one line (tests/unit/test_resume_key.py), before any model is built.
    proc = _run("sft", run_dir, ["parallel.tensor_model_parallel_size=2",
                                 "data.pack_sequences=true"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "wmss sft: error: resume: data.pack_sequences changed from False to True since "
        "checkpoint iter_0000012; start a new run directory (or restore the old setting)")
    # The refused rerun leaves the run's resolved config as the run wrote it.
    assert "pack_sequences: false" in (run_dir / "config.yaml").read_text()
    proc = _run("joint", run_dir, [])
    assert proc.returncode == 2 and "written by `wmss sft`, not `wmss joint`" in proc.stderr


@pytest.fixture(scope="module")
def packed_sft_reference(tmp_path_factory):
    """The uninterrupted packed `wmss sft` run: (its directory, its wall clock in s)."""
    run_dir = tmp_path_factory.mktemp("packed") / "run"
    start = time.monotonic()
    proc = _run("sft", run_dir, PACKED_SFT)
    assert proc.returncode == 0, proc.stderr
    return run_dir, time.monotonic() - start


def test_sigkill_at_random_moments_then_rerun_reproduces_every_packed_sft_loss(
        packed_sft_reference, tmp_path):
    from tests.kills import describe, failures, kill_rounds

    reference, duration = packed_sft_reference
    want = _losses(reference)
    # Moments uniform over the uninterrupted run's wall clock, not only between steps: in
    # startup, tokenization and packing, a step, a save, the shutdown. A rerun after the run
    # has finished starts a new run directory (tests/kills.py), so all KILLS are real kills.
    for round_, attempts in kill_rounds(
            lambda r: _command("sft", tmp_path / f"run{r}", PACKED_SFT), duration=duration,
            kills=KILLS, seed=KILL_SEED, log_dir=tmp_path / "logs"):
        story = f"uninterrupted {duration:.1f} s; round {round_}: {describe(attempts)}"
        print(story)
        assert not failures(attempts), story
        assert _losses(tmp_path / f"run{round_}") == want, story
