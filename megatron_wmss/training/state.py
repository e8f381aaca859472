"""Full training state on disk: resumable checkpoints of a run, with a ``latest`` pointer.

    RUN_DIR/checkpoints/iter_0000005/        megatron distributed checkpoint (torch_dist):
        model weights at the top level       (the same keys as a weights-only checkpoint, so
                                              export-hf, extract and init load it as is),
        optimizer/…                          fp32 master weights, Adam moments, step,
        rng/…                                per rank: CPU, CUDA, megatron's tracker, python and
                                              numpy RNG states,
        train_state.json                     step, consumed samples, skip counters, data seed,
                                              LR scheduler, what a resume must not change,
        wmss_model.json, tokenizer/          the model description (export needs no flags)
    RUN_DIR/checkpoints/latest               the name of the newest complete checkpoint
    RUN_DIR/checkpoints/iter_0000012-nonfinite/  saved when a run stops on non-finite steps

A checkpoint is written into a temporary sibling and renamed in only after every rank finished
(:func:`~megatron_wmss.platform.files.publishing_directory`, synced to disk first); then rank 0
rewrites ``latest`` atomically and deletes checkpoints beyond ``keep_last``. A crash at any
point leaves the previous checkpoint complete and ``latest`` naming it. Loading works at any
tensor/pipeline/data-parallel layout (the optimizer state is saved fully reshardable); RNG
states are restored only at the layout they were saved at.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_wmss.platform import cuda_available
from megatron_wmss.platform.files import publishing_directory, write_file_atomic
from megatron_wmss.training.checkpoint import unwrap_model

__all__ = ["TrainState", "checkpoint_name", "find_resume_checkpoint", "load_training_checkpoint",
           "read_train_state", "save_training_checkpoint"]

STATE_FILE = "train_state.json"
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    """Counters of the training loop (everything but tensors)."""

    step: int = 0
    """Optimizer iterations done (skipped ones included); also the λ-schedule position."""
    consumed_samples: int = 0
    """Samples taken by all data-parallel ranks together (the sampler's resume point)."""
    skipped_steps: int = 0
    """Iterations whose loss or gradient norm was not finite (no update made)."""
    nonfinite_in_row: int = 0
    """Consecutive non-finite iterations up to now."""
    data_seed: int = 0
    """Seed of the data order (checked on resume: another seed would repeat samples)."""
    total_steps: int = 0
    """Iterations the run was planned with."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _optimizer_metadata() -> dict:
    # Fully reshardable: the distributed optimizer's state loads at any TP/PP/DP layout. On CPU
    # the memory-efficient variant gathers over gloo (the other one uses .cuda()).
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": not cuda_available()}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: Optional[dict]):
    """One RNG object per rank (pipeline, tensor, data-parallel): each restores its own."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
         ps.get_data_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
         ps.get_data_parallel_rank()),
        replica_id=0)


def _sharded_state(setup, is_loading: bool, with_rng: bool) -> dict:
    module = unwrap_model(setup.model[0])
    model_sd = module.sharded_state_dict()
    state = dict(model_sd)
    state["optimizer"] = setup.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=_optimizer_metadata())
    if with_rng:
        state["rng"] = _rng_sharded(None if is_loading else _rng_state())
    return state


def _layout() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size()]


def _write_json(path: Path, payload: dict) -> None:
    write_file_atomic(path, json.dumps(payload, indent=2))


def save_training_checkpoint(setup, state: TrainState, checkpoints_dir: str | os.PathLike, *,
                             keep_last: int, metadata_writer=None, nonfinite: bool = False,
                             recipe_key: Optional[dict] = None) -> Path:
    """Collectively write the full training state after ``state.step`` iterations.

    ``metadata_writer(directory)`` (rank 0, inside the temporary directory) adds the model
    description. ``nonfinite`` names the checkpoint ``…-nonfinite`` and leaves ``latest`` and
    the retention alone. Returns the published directory.
    """
    from megatron.core import dist_checkpointing

    root = Path(checkpoints_dir)
    name = checkpoint_name(state.step) + ("-nonfinite" if nonfinite else "")
    final = root / name
    payload = {"train_state": asdict(state), "scheduler": setup.scheduler.state_dict(),
               "layout": _layout(), "recipe": recipe_key}
    # A rerun may find the directory of a step it saved before a crash: same step, same data.
    with publishing_directory(final, overwrite=True, collective=True, tag="save") as tmp:
        dist_checkpointing.save(_sharded_state(setup, is_loading=False, with_rng=True), str(tmp))
        if dist.get_rank() == 0:
            _write_json(tmp / STATE_FILE, payload)
            if metadata_writer is not None:
                metadata_writer(tmp)
    if dist.get_rank() == 0 and not nonfinite:
        _write_json(root / LATEST, {"checkpoint": name, "step": state.step})
        _retain(root, keep_last, keep=name)
    dist.barrier()
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for path in root.iterdir():
            match = _ITER.match(path.name)
            if match and (path / "metadata.json").is_file() and (path / STATE_FILE).is_file():
                out.append((int(match.group(1)), path))
    return sorted(out)


def _retain(root: Path, keep_last: int, keep: str) -> None:
    for _, path in _complete_checkpoints(root)[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a rerun resumes from: the one ``latest`` names when it is complete, else
    the newest complete one; None when there is none. Non-finite checkpoints never count."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            named = None
        if named is not None and _ITER.match(named.name) and \
                (named / "metadata.json").is_file() and (named / STATE_FILE).is_file():
            return named
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_train_state(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_training_checkpoint(setup, directory: str | os.PathLike) -> TrainState:
    """Collectively load model(s), optimizer, scheduler and (same layout only) RNG states."""
    from megatron.core import dist_checkpointing

    payload = read_train_state(directory)
    same_layout = payload.get("layout") == _layout()
    module = unwrap_model(setup.model[0])
    loaded = dist_checkpointing.load(_sharded_state(setup, is_loading=True, with_rng=same_layout),
                                     str(directory))
    optimizer_state = loaded.pop("optimizer")
    rng = loaded.pop("rng", None)
    with torch.no_grad():
        module.load_state_dict(loaded, strict=True)
    setup.optimizer.load_state_dict(optimizer_state)
    setup.scheduler.load_state_dict(payload["scheduler"])
    if rng is not None:
        _set_rng_state(rng)
    state = TrainState(**payload["train_state"])
    setup.step = state.step
    return state

