"""What a megatron checkpoint directory carries beside its weights, so export needs no flags.

``<ckpt>/wmss_model.json``  the :class:`ModelConfig` (plus the HF architecture and weight dtype
                            it came from);
``<ckpt>/hf_config.json``   the original HF ``config.json``, verbatim, so export reproduces it;
``<ckpt>/tokenizer/``       the HF tokenizer, chat-template and generation files.

megatron's ``dist_checkpointing`` ignores files it did not write, so these sit beside its own.
Checkpoints written by training carry them when the trainer calls :func:`copy_model_metadata`
from the checkpoint it started from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_wmss.config import ModelConfig
from megatron_wmss.interop.hf_io import copy_tokenizer_files, read_json

__all__ = [
    "HF_CONFIG_FILE",
    "MODEL_FILE",
    "TOKENIZER_DIR",
    "CheckpointMetadata",
    "copy_model_metadata",
    "model_config_from_dict",
    "read_model_metadata",
    "write_model_metadata",
]

MODEL_FILE = "wmss_model.json"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
_FORMAT = "wmss-model-1"


@dataclass
class CheckpointMetadata:
    """The model description stored beside a checkpoint's weights."""

    model: ModelConfig
    hf_architecture: str | None = None
    """e.g. ``Qwen3ForCausalLM``; None for models that never came from HF."""
    hf_dtype: str | None = None
    """dtype of the HF weights imported (export writes this dtype back by default)."""
    hf_config: dict[str, Any] | None = None
    """The original HF config.json, or None."""
    tokenizer_dir: Path | None = None
    """Directory of the copied tokenizer files, or None."""


def model_config_from_dict(fields: dict[str, Any], source: str = MODEL_FILE) -> ModelConfig:
    """ModelConfig from a dict; unknown fields are an error (a newer or foreign file)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown ModelConfig fields {unknown}; known: {sorted(known)}")
    return ModelConfig(**fields)


def write_model_metadata(directory: str | os.PathLike, model: ModelConfig, *,
                         hf_architecture: str | None = None, hf_dtype: str | None = None,
                         hf_config: dict[str, Any] | None = None,
                         tokenizer_src: str | os.PathLike | None = None) -> None:
    """Write ``wmss_model.json`` (and ``hf_config.json``, ``tokenizer/``) into ``directory``."""
    directory = Path(directory)
    # A description serves loading (init, export, evaluation): dropout is a setting of one
    # training run, which a run started from this checkpoint must not inherit unasked.
    model = dataclasses.replace(model, hidden_dropout=0.0, attention_dropout=0.0)
    record = {"format": _FORMAT, "model": dataclasses.asdict(model),
              "hf_architecture": hf_architecture, "hf_dtype": hf_dtype}
    (directory / MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, directory / TOKENIZER_DIR)


def read_model_metadata(directory: str | os.PathLike) -> CheckpointMetadata:
    """Read what :func:`write_model_metadata` wrote; FileNotFoundError says how to fix it."""
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} carries no model description. Checkpoints from "
            "`wmss import-hf` have one; for others pass the checkpoint they started from "
            "(--model-from DIR) or copy its metadata with copy_model_metadata(src, dst)")
    record = read_json(path)
    if record.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r} is not {_FORMAT!r}")
    hf_config_path = directory / HF_CONFIG_FILE
    tokenizer = directory / TOKENIZER_DIR
    return CheckpointMetadata(
        model=model_config_from_dict(record["model"], str(path)),
        hf_architecture=record.get("hf_architecture"),
        hf_dtype=record.get("hf_dtype"),
        hf_config=read_json(hf_config_path) if hf_config_path.is_file() else None,
        tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
    )


def copy_model_metadata(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src``'s model description into checkpoint directory ``dst`` (which must exist)."""
    src, dst = Path(src), Path(dst)
    read_model_metadata(src)  # fail early, with the explanatory error, when src has none
    for name in (MODEL_FILE, HF_CONFIG_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / TOKENIZER_DIR).is_dir():
        shutil.copytree(src / TOKENIZER_DIR, dst / TOKENIZER_DIR, dirs_exist_ok=True)
