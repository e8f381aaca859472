"""`sbatch launch/wmss.slurm` on real Slurm clusters brought up on this machine.

One node on loopback and two nodes made of network namespaces (tests/slow/slurm_cluster.py).
Each job trains the shipped tiny SFT recipe, shortened to STEPS optimizer steps, with two gloo
ranks at data parallel 2: both on one node, or one on each node so that the rendezvous and the
gradient all-reduce cross the bridge between the "nodes". CPU gloo sums two numbers the same
way wherever the ranks run, so the two-node run must reproduce every loss of the one-node run
exactly, also when it is preempted with USR1 mid-run, requeued and resumed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.slow.slurm_cluster import SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "wmss.slurm"
STEPS, SAVE_EVERY = 8, 4
SHORT = [f"trainer.train_steps={STEPS}", f"trainer.save_interval={SAVE_EVERY}",
         "trainer.keep_last=10", "trainer.progress_bar=false", "trainer.tensorboard=false"]
SFT = {"WMSS_COMMAND": "sft", "WMSS_CONFIG": "examples/recipes/tiny-sft.yaml"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(unavailable_reason() is not None,
                                 reason=unavailable_reason() or "")]


def _sbatch(cluster: SlurmCluster, log: Path, env: dict, args=(), nodes=1, tasks_per_node=2,
            background=False, timeout=600):
    """``sbatch --wait`` the script from the repository root: (job id, exit code, log text)
    once the job (and any requeued run of it) has ended; ``background``: the running sbatch
    (its first stdout line is the job id)."""
    cmd = ["sbatch", "--wait", "--parsable", f"--nodes={nodes}",
           f"--ntasks-per-node={tasks_per_node}", f"--output={log}", "--time=00:20:00",
           str(SCRIPT), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**cluster.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if background:
        return proc
    out, err = proc.communicate(timeout=timeout)
    job_id = out.strip().split(";")[0]
    return job_id, proc.returncode, (log.read_text() if log.exists() else "") + err


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(run_dir: Path) -> list[float]:
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    return [r["loss"] for r in records]


def _assert_completed(cluster: SlurmCluster, job_id: str, rc: int, log: str, run_dir: Path,
                      restarts: int = 0) -> None:
    job = cluster.job(job_id)
    assert rc == 0 and job["JobState"] == "COMPLETED", (job, log[-4000:], cluster.logs())
    assert job["Restarts"] == str(restarts), job
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
    assert latest["step"] == STEPS
    assert (run_dir / "checkpoints" / latest["checkpoint"] / "train_state.json").is_file()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm1"), nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def one_node_run(one_node, tmp_path_factory):
    """The reference: two ranks (DP=2) on one node, uninterrupted."""
    work = tmp_path_factory.mktemp("one-node-run")
    run_dir, log = work / "run", work / "job.log"
    job_id, rc, text = _sbatch(one_node, log, SFT, ["--run-dir", str(run_dir), *SHORT])
    return job_id, rc, text, run_dir


def test_one_node_job_completes_with_a_checkpoint_metrics_and_a_full_log(one_node, one_node_run):
    job_id, rc, log, run_dir = one_node_run
    _assert_completed(one_node, job_id, rc, log, run_dir)
    records = _records(run_dir)
    assert len(records) == STEPS and all(r["loss"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # it trained
    # The log says what ran where, holds `wmss env` and the resolved recipe.
    assert f"job {job_id} restart 0 on n0: 2 rank(s), 2 per node" in log
    assert '"megatron_core"' in log and '"layer_spec"' in log
    assert "resolved recipe:" in log and f"run_dir: {run_dir}" in log
    assert "vocab_size: 320" in log  # resolved from the tokenizer, not the recipe's null
    assert "wmss sft finished" in log
    assert json.loads((run_dir / "checkpoints" / "latest").read_text())["step"] == STEPS


def test_failures_are_not_requeued_and_the_log_names_the_error(one_node, tmp_path):
    # A bad recipe: refused on one task before any rank starts.
    job_id, rc, log = _sbatch(one_node, tmp_path / "bad.log", SFT,
                              ["--run-dir", str(tmp_path / "bad"), "optim.lr=-1"])
    job = one_node.job(job_id)
    assert rc == 2 and job["JobState"] == "FAILED" and job["Restarts"] == "0", (job, log)
    assert re.search(r"wmss sft: error: optim: .*lr must be > 0, got -1", log), log
    assert "the checks before the ranks failed (exit 2" in log and "requeueing" not in log
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # A stage failing in the ranks themselves (its data file is missing): not requeued either.
    missing = tmp_path / "missing.jsonl"
    job_id, rc, log = _sbatch(one_node, tmp_path / "entropy.log", {"WMSS_COMMAND": "entropy"},
                              ["--model", str(tmp_path / "ckpt"), "--data", str(missing),
                               "--out", str(tmp_path / "h.jsonl")])
    job = one_node.job(job_id)
    assert rc == 2 and job["JobState"] == "FAILED" and job["Restarts"] == "0", (job, log)
    assert str(missing) in log and "wmss entropy: error:" in log
    assert "wmss entropy failed with exit 2: not requeued" in log
    # Refused by the script itself: no command; a container image where pyxis is missing
    # (never silently run on the host instead).
    job_id, rc, log = _sbatch(one_node, tmp_path / "none.log", {"WMSS_COMMAND": ""})
    assert rc == 2 and "set WMSS_COMMAND" in log, log
    job_id, rc, log = _sbatch(one_node, tmp_path / "pyxis.log",
                              {**SFT, "WMSS_CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.12-py3"})
    assert rc == 2 and "pyxis is not installed" in log and "megatron_core" not in log, log


def test_a_container_image_reaches_every_srun_through_pyxis(one_node, tmp_path):
    # No pyxis here: an `srun` first on PATH that lists --container-image in its help (as
    # pyxis adds it) and records the options of the steps the script starts, which it then
    # stops (a stand-in; the real pyxis path is not run on this machine).
    real_srun, calls = shutil.which("srun"), tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/bin/bash
if [[ "$1" == --help ]]; then {real_srun} --help; echo "  --container-image=IMAGE (pyxis)"; exit 0; fi
args="$*"; echo "${{args//$'\\n'/ }}" >> {calls}
""")
    (bin_dir / "srun").chmod(0o755)
    image = "registry.example.com/megatron-wmss:0.1.0"
    env = {**SFT, "WMSS_CONTAINER_IMAGE": image, "PATH": f"{bin_dir}:{one_node.env['PATH']}"}
    job_id, rc, log = _sbatch(one_node, tmp_path / "job.log", env, ["optim.lr=1e-4"])
    assert rc == 0 and f"container: {image} (pyxis)" in log, log
    steps = calls.read_text().splitlines()
    assert len(steps) == 2, steps  # the checks on one task, then the ranks
    for step in steps:
        assert f"--container-image={image} --container-mounts={REPO}:{REPO} " \
               f"--container-workdir={REPO} python " in step, step
    assert steps[0].startswith("--nodes=1 --ntasks=1") and "--print-config" in steps[0]
    assert steps[1].startswith("--ntasks-per-node=2 --ntasks=2 --wait=300")
    assert steps[1].endswith("python -m megatron_wmss.cli sft --config "
                             "examples/recipes/tiny-sft.yaml optim.lr=1e-4")


def test_two_node_job_preempted_by_usr1_requeues_and_reproduces_the_one_node_losses(
        two_nodes, one_node_run, tmp_path):
    """One rank on each node; USR1 mid-run, the requeued job resumes and completes. Every loss
    must equal the uninterrupted one-node run's: at DP=2 gloo sums the same two numbers
    wherever the ranks run, and a resumed CPU run continues bit-identically. (One job checks
    both the two-node layout and the preemption cycle: the suite's time budget.)"""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    proc = _sbatch(two_nodes, log_path, SFT, ["--run-dir", str(run_dir), *SHORT], nodes=2,
                   tasks_per_node=1, background=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    deadline = time.monotonic() + 300
    while len(_records(run_dir)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.poll(), log_path.read_text() if log_path.exists() else "", two_nodes.logs())
        time.sleep(0.2)
    # As `--signal=B:USR1@300` does before the time limit: the batch shell alone gets it and
    # must pass it on to the ranks on both nodes.
    signal = two_nodes.run("scancel", "--batch", "--signal=USR1", job_id)
    assert signal.returncode == 0, signal.stderr
    _, err = proc.communicate(timeout=600)
    log = log_path.read_text()
    _assert_completed(two_nodes, job_id, proc.returncode, log + err, run_dir, restarts=1)
    # Ranks on both nodes, meeting at n1's address across the bridge.
    assert f"job {job_id} restart 0 on n[1-2]: 2 rank(s), 1 per node" in log
    assert "master 10.77.0.1:" in log
    stopped = int(re.search(r"wmss sft: SIGUSR1 at step (\d+): saved", log).group(1))
    assert 3 <= stopped < STEPS, log
    assert "got SIGUSR1: passing it to the ranks" in log
    assert f"requeueing job {job_id} to resume from its checkpoint" in log
    assert f"job {job_id} restart 1 on n[1-2]" in log
    assert re.search(rf"resuming from \S+iter_{stopped:07d} \(step {stopped} of {STEPS}\)", log)
    # Every step once, with the uninterrupted one-node run's losses.
    assert _losses(run_dir) == _losses(one_node_run[3])
