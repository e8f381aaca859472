"""What a plan reads: the config's sections, the model's architecture, the data's size.

A plan is made before a job is submitted, usually on a machine where the data and the
checkpoints are not (yet): recipes are built and checked by ``training.recipe.build_recipe``
exactly as ``wmss sft|joint|run`` do, except that their files need not exist. The architecture
comes from ``--model`` (an HF ``config.json`` or its directory, or a megatron checkpoint's
``wmss_model.json`` or directory), else from the config's base / init checkpoint when it is
here, else from the recipe's ``model`` section; the recipe's ``model`` section is applied on top
(dtype, FP8, ...), as ``training.recipe.resolve_model`` does. The data size is the number of
rows in the data files (blank lines skipped; samples dropped at tokenization cannot be known
before), or ``--samples``.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import tempfile
from pathlib import Path
from typing import Optional

from megatron_wmss.config import ARCHITECTURE_FIELDS, ModelConfig
from megatron_wmss.config.recipe import RecipeError, build_dataclass, to_plain
from megatron_wmss.training.recipe import Recipe

__all__ = ["CONFIG_KINDS", "config_kind", "count_rows", "read_architecture", "recipe_sections",
           "resolve_stage_model"]

#: What a config file can be: a ``wmss sft`` / ``wmss joint`` recipe or a ``wmss run`` config.
CONFIG_KINDS = ("sft", "joint", "run")


def config_kind(raw: dict) -> str:
    """``run`` for a pipeline config (it has ``training`` or ``base``), ``joint`` for a recipe
    with a ``mix`` section or strong/weak init, else ``sft``."""
    if "training" in raw or "base" in raw:
        return "run"
    init = raw.get("init") or {}
    if raw.get("mix") is not None or (isinstance(init, dict) and ("strong" in init
                                                                    or "weak" in init)):
        return "joint"
    return "sft"


def recipe_sections(command: str, raw: dict) -> Recipe:
    """The :class:`Recipe` ``wmss sft|joint`` would run, with every check of
    ``training.recipe.build_recipe`` but that its files exist: while it runs, the data,
    active-set, tokenizer and init paths are swapped for an empty stand-in file (its file
    checks test existence only), then the recipe's own paths, validated by their
    dataclasses, are put back."""
    from megatron_wmss.data.config import DataConfig, TokenizerConfig
    from megatron_wmss.training.recipe import InitConfig, build_recipe

    with tempfile.TemporaryDirectory(prefix="wmss-plan-") as tmp:
        stand_in = str(Path(tmp) / "stand-in.jsonl")
        Path(stand_in).write_text("")
        recipe = build_recipe(command, _with_stand_ins(raw, stand_in))
    data = raw.get("data") or {}
    if isinstance(data, dict) and "paths" in data:
        recipe.data = build_dataclass(DataConfig, data, "data")
    if recipe.tokenizer is not None:
        recipe.tokenizer = build_dataclass(TokenizerConfig, raw["tokenizer"], "tokenizer")
    recipe.init = build_dataclass(InitConfig, raw.get("init"), "init")
    return recipe


def _with_stand_ins(raw: dict, stand_in: str) -> dict:
    """A copy of ``raw`` with each file path (data, active set, tokenizer, init) → ``stand_in``."""
    out = copy.deepcopy(raw)
    data = out.get("data")
    if isinstance(data, dict):
        if data.get("paths"):
            data["paths"] = [stand_in]
        if data.get("active_set") is not None:
            data["active_set"] = stand_in
    tokenizer = out.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("path"), str):
        tokenizer["path"] = stand_in
    init = out.get("init")
    if isinstance(init, dict):
        for name, path in init.items():
            if path is not None:
                init[name] = stand_in
    return out


def read_architecture(path: str) -> ModelConfig:
    """The ModelConfig an HF ``config.json`` (file or directory), a megatron checkpoint
    (``wmss_model.json`` or its directory) or a training run's ``checkpoints/`` describes."""
    from megatron_wmss.interop.hf_config import model_config_from_hf
    from megatron_wmss.interop.metadata import MODEL_FILE, model_config_from_dict

    p = Path(path).expanduser()
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            p = p / MODEL_FILE
        elif (p / "config.json").is_file():
            p = p / "config.json"
        else:
            from megatron_wmss.training.state import find_resume_checkpoint

            found = find_resume_checkpoint(p)
            if found is None or not (found / MODEL_FILE).is_file():
                raise FileNotFoundError(f"{path} holds neither an HF config.json nor a megatron "
                                        f"checkpoint's {MODEL_FILE}")
            p = found / MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"model description {path} does not exist (an HF config.json "
                                f"or its directory, or a megatron checkpoint)")
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from None
    if isinstance(record, dict) and "architectures" in record:
        return model_config_from_hf(record, source=str(p))
    if isinstance(record, dict) and isinstance(record.get("model"), dict):
        return model_config_from_dict(record["model"], str(p))
    raise ValueError(f"{p} is neither an HF config.json (no 'architectures') nor a "
                     f"{MODEL_FILE} (no 'model')")


def resolve_stage_model(base: Optional[ModelConfig], overrides: dict, where: str,
                        tokenizer_vocab: Optional[int] = None) -> ModelConfig:
    """``base`` with the recipe's model section ``overrides`` applied (architecture fields
    must agree, as ``resolve_model`` requires), or the model section alone when there is no
    base (its vocab_size defaulting to ``tokenizer_vocab``). ``where``: the section holding
    the model section ("" for a recipe, "training" for a run config), for messages."""
    section = f"{where}.model" if where else "model"
    if base is None:
        fields = dict(overrides)
        if tokenizer_vocab is not None:
            fields.setdefault("vocab_size", tokenizer_vocab)
        if not fields:
            raise RecipeError(f"no {section} section and no checkpoint to take the architecture "
                              "from; pass --model (an HF config.json or a megatron checkpoint)")
        if "vocab_size" not in fields:
            raise RecipeError(f"{section}.vocab_size is needed (no tokenizer here to take it "
                              "from); set it or pass --model")
        return build_dataclass(ModelConfig, fields, section)
    cfg = build_dataclass(ModelConfig, {**to_plain(base), **overrides}, section)
    for name in ARCHITECTURE_FIELDS:
        if getattr(cfg, name) != getattr(base, name):
            raise RecipeError(f"{section}.{name}={getattr(cfg, name)!r} differs from the "
                              f"planned architecture's {getattr(base, name)!r}")
    return cfg


def stored_chunk_bytes(path: str) -> Optional[int]:
    """Bytes of the largest model-weight chunk a megatron checkpoint stores (torch's
    distributed-checkpoint metadata: one chunk per shard it was saved with, so the
    embedding's ``V/t x h`` at the TP it was saved at), optimizer state left out; None for
    an HF directory or anything unreadable."""
    from torch.distributed.checkpoint import FileSystemReader

    p = Path(path).expanduser()
    if not (p / "metadata.json").is_file():
        from megatron_wmss.training.state import find_resume_checkpoint

        p = find_resume_checkpoint(p) if p.is_dir() else None
        if p is None or not (p / "metadata.json").is_file():
            return None
    try:
        meta = FileSystemReader(str(p)).read_metadata()
    except Exception:  # noqa: BLE001 - another format or a damaged file: unknown
        return None
    largest = 0
    for key, item in meta.state_dict_metadata.items():
        chunks = getattr(item, "chunks", None)
        if not chunks or key.startswith("optimizer") or "_extra_state" in key:
            continue
        size = item.properties.dtype.itemsize
        largest = max(largest, max(math.prod(c.sizes) for c in chunks) * size)
    return largest or None


def count_rows(paths: list[str]) -> Optional[int]:
    """Rows (samples) in the data files, or None when one is a hub dataset or not here."""
    from megatron_wmss.data.sources import resolve_paths

    try:
        resolved = resolve_paths(list(paths))
    except (FileNotFoundError, ValueError):
        return None
    total = 0
    for name, builder in resolved:
        if builder is None:
            return None
        if builder == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(name).metadata.num_rows
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                total += len(json.load(f))
            else:
                total += sum(1 for line in f if line.strip())
    return total
