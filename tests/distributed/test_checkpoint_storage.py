"""Checkpoint storage failures: a full disk while saving, damaged checkpoints at resume.

The real command line (`wmss sft --nproc-per-node 2` on the tiny recipe, 3 steps, a checkpoint
after each) against one reference run: a run that resumes must reproduce the reference's
losses exactly (CPU with gloo is deterministic at one layout), which shows it loaded the
checkpoint it says it did, in full. The full disk is a real one: a small tmpfs (root only; the
CI runs as root) filled with a ballast file, so the save meets the kernel's ENOSPC wherever
megatron's writers happen to be.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from megatron_wmss.testing import DistributedRunError, run_distributed

REPO = Path(__file__).resolve().parents[2]
RUN = ["trainer.train_steps=3", "trainer.save_interval=1", "trainer.keep_last=3",
       "trainer.progress_bar=false", "trainer.tensorboard=false"]
pytestmark = pytest.mark.slow


def _sft(run_dir: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_wmss.cli", "sft", "--config",
         str(REPO / "examples" / "recipes" / "tiny-sft.yaml"), "--run-dir", str(run_dir),
         "--nproc-per-node", "2", *RUN], cwd=REPO, capture_output=True, text=True,
        timeout=timeout)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def _copy_run(source: Path, run_dir: Path, checkpoints=("iter_0000001", "iter_0000002",
                                                          "iter_0000003")) -> Path:
    """The reference run directory with only ``checkpoints``, ``latest`` naming the newest."""
    shutil.copytree(source, run_dir, ignore=lambda d, names: [
        n for n in names if n.startswith("iter_") and n not in checkpoints])
    (run_dir / "metrics.jsonl").unlink()
    newest = max(checkpoints)
    (run_dir / "checkpoints" / "latest").write_text(
        json.dumps({"checkpoint": newest, "step": int(newest[5:])}))
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _sft(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoints" / "iter_0000003" / "manifest.json").is_file()
    return run_dir


def test_damaged_checkpoints_give_way_to_an_intact_one_or_stop_in_one_line(reference, tmp_path):
    run_dir = _copy_run(reference, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    shard = checkpoints / "iter_0000003" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # truncated
        f.truncate(1024)
    state = checkpoints / "iter_0000002" / "train_state.json"
    data = bytearray(state.read_bytes())
    data[data.index(b'"step": 2') + 8] = ord("7")  # one byte changed, same size
    state.write_bytes(bytes(data))
    common = checkpoints / "iter_0000001" / "common.pt"
    kept = common.read_bytes()
    common.unlink()  # missing

    proc = _sft(run_dir)
    assert proc.returncode == 74, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"wmss sft: error: no intact checkpoint to resume from in "
                           f"{checkpoints}: iter_0000003 is damaged (__0_0.distcp: size 1024, "
                           f"expected {size}); iter_0000002 is damaged (train_state.json: "
                           "checksum "), line
    assert "iter_0000001 is damaged (common.pt: missing)" in line
    # Nothing set aside: a rerun must not quietly start the run over.
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "iter_0000001", "iter_0000002", "iter_0000003", "latest"]

    # iter_0000001 as a checkpoint from before manifests: accepted, said so. (One that lost
    # its manifest is damaged: its train_state.json says it was written with one.)
    common.write_bytes(kept)
    (checkpoints / "iter_0000001" / "manifest.json").unlink()
    state = checkpoints / "iter_0000001" / "train_state.json"
    payload = json.loads(state.read_text())
    assert payload.pop("manifest") is True
    state.write_text(json.dumps(payload))
    proc = _sft(run_dir)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if "iter_0000001" in line]
    assert said[0] == (f"wmss sft: checkpoint iter_0000003 is damaged (__0_0.distcp: size 1024, "
                       f"expected {size}); resuming from iter_0000001 (iter_0000003 moved to "
                       "iter_0000003-damaged)"), said
    assert said[1].startswith("wmss sft: checkpoint iter_0000002 is damaged (train_state.json: "
                              "checksum ")
    assert said[2] == ("wmss sft: checkpoint iter_0000001 has no manifest.json (written before "
                       "manifests): resuming from it unchecked")
    want = _losses(reference)
    assert _losses(run_dir) == {2: want[2], 3: want[3]}
    assert {"iter_0000002-damaged", "iter_0000003-damaged"} <= {
        p.name for p in checkpoints.iterdir()}


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", f"wmss-{uuid.uuid4().hex}",
                           str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_stops_the_save_in_one_line_and_the_rerun_resumes(reference,
                                                                    small_filesystem):
    run_dir = _copy_run(reference, small_filesystem / "run", checkpoints=("iter_0000001",))
    checkpoints = run_dir / "checkpoints"
    size = sum(p.stat().st_size for p in (checkpoints / "iter_0000001").rglob("*"))
    # Room for half a checkpoint: the save of step 2 runs out of space part-way.
    ballast = small_filesystem / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_filesystem).free - size // 2))

    proc = _sft(run_dir)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"wmss sft: error: no space left to save checkpoint iter_0000002 in "
                           f"{checkpoints}: it needs about "), line
    assert "free; iter_0000001 and `latest` are intact" in line
    # The temporary directory (dot name) is gone with the space it held; iter_0000001 stays.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000001", "latest"]
    assert json.loads((checkpoints / "latest").read_text())["checkpoint"] == "iter_0000001"
    assert _losses(run_dir) == {2: _losses(reference)[2]}  # step 2 ran, its save failed

    ballast.unlink()  # space freed: the same command resumes
    proc = _sft(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert _losses(run_dir) == {k: v for k, v in _losses(reference).items() if k > 1}


def _rank0_fails_inside_the_save(workdir):
    """Rank 0 runs out of space writing metadata.json, which megatron writes on rank 0 alone
    while the other ranks wait at a barrier inside dist_checkpointing.save."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import serialization

    from megatron_wmss.training.state import TrainState, save_training_checkpoint
    from tests.distributed.test_trainer_state import _setup

    setup = _setup(joint=False)
    save_training_checkpoint(setup, TrainState(step=1), workdir, keep_last=2)
    real = serialization.save_config

    def no_space(*args, **kwargs):
        if dist.get_rank() == 0:
            raise OSError(errno.ENOSPC, "No space left on device", "metadata.json")
        return real(*args, **kwargs)

    serialization.save_config = no_space
    save_training_checkpoint(setup, TrainState(step=2), workdir, keep_last=2)


def test_a_save_failing_on_one_rank_alone_ends_every_rank(tmp_path):
    # Before: rank 0 waited in the publishing all-gather, rank 1 at megatron's barrier, forever.
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_rank0_fails_inside_the_save, world_size=2, args=(str(tmp_path),),
                        timeout=120)
    first = info.value.failures[0]
    assert first.rank == 0 and first.exc_type == "CheckpointSpaceError", str(info.value)
    assert first.exc_message.startswith(f"no space left to save checkpoint iter_0000002 in "
                                        f"{tmp_path}")
    # Rank 0 removed the temporary directory on its own; the previous checkpoint stands.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]
