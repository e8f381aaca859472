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

A rank that fails alone inside megatron's save (rank 0 writes ``common.pt`` and
``metadata.json`` by itself; each rank plans and stages its own shards) leaves its peers in a
collective it will never join. It joins no other either (one could match theirs and hang every
rank): it posts its failure (:func:`~megatron_wmss.platform.ranks.post_failure`: torchrun and
srun ranks that watch for it end with its error), then removes the temporary directory and
raises its own error (the local launcher then stops its peers). In that order: a peer still
writing into the directory would otherwise fail on its own, with an error that hides the cause.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_wmss.platform.files import CollectiveAbandoned, publishing_directory
from megatron_wmss.platform.ranks import post_failure

__all__ = ["load_model_checkpoint", "publishing_checkpoint", "save_model_checkpoint",
           "unwrap_model", "write_model_checkpoint"]


def unwrap_model(model):
    """The megatron module inside DDP (or any ``.module`` wrappers)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def write_model_checkpoint(model, directory: str | os.PathLike) -> None:
    """Collectively write ``model``'s weights into the existing, empty ``directory``, in place.

    The building block of :func:`save_model_checkpoint`, for writers that add files of their
    own to the checkpoint inside :func:`publishing_checkpoint`. An exception raised on this
    rank is raised as :class:`CollectiveAbandoned` (see the module docstring); a failed shard
    write reaches every rank as torch's CheckpointException, a BaseException, and passes as is.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    try:
        dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(directory))
    except Exception as err:
        post_failure(err)  # before the temporary directory goes: see the module docstring
        raise CollectiveAbandoned(f"rank {dist.get_rank()}: {type(err).__name__}: {err}") \
            from err


@contextlib.contextmanager
def publishing_checkpoint(directory: str | os.PathLike, overwrite: bool = False, *,
                          tag: str | None = None) -> Iterator[Path]:
    """Collectively yield a temporary sibling of ``directory`` that becomes ``directory`` once
    every rank has written its part (:func:`publishing_directory` with ``collective=True``).

    A rank that failed alone in :func:`write_model_checkpoint` raises its own error, not the
    :class:`CollectiveAbandoned` it came as: its type decides the exit status, and its one-line
    message is what the peers are told.
    """
    try:
        with publishing_directory(directory, overwrite, collective=True, tag=tag) as tmp:
            yield tmp
    except CollectiveAbandoned as err:
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None


def save_model_checkpoint(model, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Collectively write ``model``'s weights (a DDP-wrapped or bare megatron module).

    Every rank must call this. Refuses an existing ``directory`` unless ``overwrite``.
    """
    with publishing_checkpoint(directory, overwrite) as tmp:
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
