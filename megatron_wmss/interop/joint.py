"""Phase 3 starts from two single-model checkpoints: weak = M0 (base), strong = M1 (phase 1).

:func:`load_joint_from_checkpoints` fills a :class:`JointGPTModel` (bare or DDP-wrapped, at any
layout) from them; :func:`write_joint_checkpoint` writes the pair as one joint checkpoint.
Both first check that the two models share the architecture (the mixed loss needs the same
vocabulary shards, pipeline stages the same layer ranges).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_wmss.config import ModelConfig, check_same_architecture
from megatron_wmss.interop.convert import (
    build_stage_model,
    checkpoint_padded_vocab,
    model_for_checkpoint,
    save_with_metadata,
)
from megatron_wmss.interop.hf_io import check_output_dir
from megatron_wmss.interop.metadata import copy_model_metadata, read_model_metadata
from megatron_wmss.models import JointGPTModel
from megatron_wmss.models.checkpoint import load_model_checkpoint, unwrap_model

__all__ = ["check_checkpoints_compatible", "load_joint_from_checkpoints",
           "write_joint_checkpoint"]


def check_checkpoints_compatible(strong_dir: str | os.PathLike, weak_dir: str | os.PathLike
                                 ) -> tuple[ModelConfig, ModelConfig]:
    """The two checkpoints' ModelConfigs; ValueError naming the first differing field."""
    strong = read_model_metadata(strong_dir).model
    weak = read_model_metadata(weak_dir).model
    try:
        check_same_architecture(strong, weak)
    except ValueError as err:
        raise ValueError(f"strong checkpoint {strong_dir} and weak checkpoint {weak_dir}: "
                         f"{err}") from None
    return strong, weak


def load_joint_from_checkpoints(joint, strong_dir: str | os.PathLike,
                                weak_dir: str | os.PathLike) -> None:
    """Collectively load the strong and weak halves of ``joint`` from single-model checkpoints.

    ``joint`` is a :class:`JointGPTModel`, bare or wrapped (DDP); any layout. The checkpoints'
    padded vocabularies must equal the model's (they depend on the tensor-parallel size the
    checkpoint was imported or trained at).
    """
    check_checkpoints_compatible(strong_dir, weak_dir)
    model = unwrap_model(joint)
    if not isinstance(model, JointGPTModel):
        raise TypeError(f"expected a JointGPTModel (optionally wrapped), got {type(model)}")
    for half, directory in ((model.strong, strong_dir), (model.weak, weak_dir)):
        rows = checkpoint_padded_vocab(directory)
        if rows != half.vocab_size:
            raise ValueError(f"checkpoint {directory} has {rows} vocabulary rows but the model "
                             f"has {half.vocab_size}: import/convert it at a tensor-parallel "
                             "size that pads the vocabulary alike")
        load_model_checkpoint(half, directory)


def write_joint_checkpoint(strong_dir: str | os.PathLike, weak_dir: str | os.PathLike,
                           out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Collectively write the two single-model checkpoints as one joint checkpoint.

    Runs at the current layout; the joint checkpoint keeps the strong checkpoint's model
    description (identical in architecture to the weak one's).
    """
    out = check_output_dir(out_dir, overwrite)
    strong_cfg, weak_cfg = check_checkpoints_compatible(strong_dir, weak_dir)
    halves = []
    for cfg, directory in ((strong_cfg, strong_dir), (weak_cfg, weak_dir)):
        rows = checkpoint_padded_vocab(directory)
        halves.append(build_stage_model(model_for_checkpoint(cfg, rows, str(directory))))
    joint = JointGPTModel(*halves)
    load_joint_from_checkpoints(joint, strong_dir, weak_dir)
    return save_with_metadata(joint, Path(out), overwrite, "joint",
                              lambda tmp: copy_model_metadata(strong_dir, tmp))
