"""Model checkpoints in megatron-core's distributed format (``torch_dist``), resharding on load.

The models' own persistence, below training and interop, which both read and write model
checkpoints through it (full training checkpoints, with optimizer and RNG states, are
:mod:`megatron_wmss.training.state`; they keep the weights at the same keys, so every loader
here reads them too).

A checkpoint written at one tensor/pipeline layout loads at any other: megatron's sharded
state dicts carry each tensor's global shape and offsets. Writes are atomic
(:func:`megatron_wmss.platform.files.publishing_directory`): ranks write into a temporary
sibling that rank 0 renames into place after everyone finished, so a crash never leaves a
half-written checkpoint under the final name (and an overwrite keeps the old one aside until
the new one is in place).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_wmss.platform.files import publishing_directory

__all__ = ["load_model_checkpoint", "save_model_checkpoint", "unwrap_model",
           "write_model_checkpoint"]


def unwrap_model(model):
    """The megatron module inside DDP (or any ``.module`` wrappers)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def write_model_checkpoint(model, directory: str | os.PathLike) -> None:
    """Collectively write ``model``'s weights into the existing, empty ``directory``, in place.

    The building block of :func:`save_model_checkpoint`, for writers that add files of their
    own to the checkpoint before publishing it.
    """
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(directory))


def save_model_checkpoint(model, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Collectively write ``model``'s weights (a DDP-wrapped or bare megatron module).

    Every rank must call this. Refuses an existing ``directory`` unless ``overwrite``.
    """
    with publishing_directory(directory, overwrite, collective=True) as tmp:
        write_model_checkpoint(model, tmp)
    return Path(directory)


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
    wanted = module.sharded_state_dict(prefix=prefix)
    state = dist_checkpointing.load(wanted, str(path))
    # load() also returns the checkpoint's common (non-sharded) state, e.g. a training
    # checkpoint's optimizer settings: keep the model's own keys only.
    state = {key[len(prefix):]: value for key, value in state.items() if key in wanted}
    with torch.no_grad():
        module.load_state_dict(state, strict=True)
