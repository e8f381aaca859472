"""Model checkpoints in megatron-core's distributed format (``torch_dist``), resharding on load.

A checkpoint written at one tensor/pipeline layout loads at any other: megatron's sharded
state dicts carry each tensor's global shape and offsets. Writes are atomic: ranks write into
``<dir>.tmp-<pid>`` and rank 0 renames it into place after everyone finished, so a crash never
leaves a half-written checkpoint under the final name (and an overwrite keeps the old one aside
until the new one is in place).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_wmss.platform.files import replace_directory

__all__ = ["load_model_checkpoint", "save_model_checkpoint", "unwrap_model"]


def unwrap_model(model):
    """The megatron module inside DDP (or any ``.module`` wrappers)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _broadcast_str(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_model_checkpoint(model, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Collectively write ``model``'s weights (a DDP-wrapped or bare megatron module).

    Every rank must call this. Refuses an existing ``directory`` unless ``overwrite``.
    """
    from megatron.core import dist_checkpointing

    final = Path(directory)
    if final.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {final} exists; pass overwrite=True to "
                              "replace it")
    tmp = Path(_broadcast_str(f"{final}.tmp-{os.getpid()}"))
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        replace_directory(tmp, final)
    dist.barrier()
    return final


def load_model_checkpoint(model, directory: str | os.PathLike, prefix: str = "") -> None:
    """Collectively load weights into ``model`` from a checkpoint of any parallel layout.

    ``prefix`` selects a sub-model of the checkpoint: ``"strong."`` loads the strong model of
    a joint checkpoint into a single ``GPTModel``. Every parameter of ``model`` must be found
    (strict load).
    """
    from megatron.core import dist_checkpointing

    path = Path(directory)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron distributed checkpoint "
                                "(no metadata.json)")
    module = unwrap_model(model)
    state = dist_checkpointing.load(module.sharded_state_dict(prefix=prefix), str(path))
    if prefix:
        state = {key[len(prefix):]: value for key, value in state.items()}
    with torch.no_grad():
        module.load_state_dict(state, strict=True)
