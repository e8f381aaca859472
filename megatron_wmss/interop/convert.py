"""HF safetensors ⇄ megatron-core distributed checkpoints, and extraction from joint checkpoints.

``import_hf`` runs on every rank of the current megatron layout (TP×PP×DP): each rank builds
its stage's ``GPTModel``, reads only the HF tensors its parameters are made of, slices its
tensor-parallel shard, and all ranks write one ``torch_dist`` checkpoint together.
``export_hf`` runs at TP=1, PP=1 (one rank is enough; data-parallel ranks just idle): megatron's
resharding load brings a checkpoint of any layout into one full model, and rank 0 writes HF
files. Both write atomically (temporary directory + rename) and refuse an existing output
unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_wmss.config import ModelConfig, ParallelConfig, params_dtype_for, torch_dtype
from megatron_wmss.interop.hf_config import (
    architecture_of,
    hf_config_from_model_config,
    model_config_from_hf,
)
from megatron_wmss.interop.hf_io import (
    SafetensorsCheckpoint,
    check_output_dir,
    copy_tokenizer_files,
    read_json,
    write_safetensors,
)
from megatron_wmss.interop.mapping import (
    bindings_for,
    detect_spec,
    global_layer_name,
    to_hf,
    to_megatron,
    tp_shard,
)
from megatron_wmss.interop.metadata import (
    copy_model_metadata,
    read_model_metadata,
    write_model_metadata,
)
from megatron_wmss.models import build_gpt_model
from megatron_wmss.models.checkpoint import (
    load_model_checkpoint,
    publishing_checkpoint,
    write_model_checkpoint,
)
from megatron_wmss.platform.files import publishing_directory
from megatron_wmss.platform.ranks import on_rank_zero

__all__ = [
    "build_stage_model",
    "checkpoint_padded_vocab",
    "checkpoint_prefix",
    "export_hf",
    "extract_megatron",
    "hf_state_dict",
    "import_hf",
    "load_checkpoint_model",
    "model_for_checkpoint",
    "save_with_metadata",
]

_EMBEDDING = "embedding.word_embeddings.weight"
# HF tensors that carry no weights of ours: RoPE tables some old checkpoints store.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def save_with_metadata(model, out: Path, overwrite: bool, tag: str,
                       write_metadata: Callable[[Path], None]) -> Path:
    """Collectively write ``model``'s checkpoint, and rank 0's metadata files, into a temporary
    sibling of ``out`` (named with ``tag``); then publish it as ``out`` in one rename.

    A failure on any one rank publishes nothing and ends every rank with its error: in rank
    0's metadata every rank raises it (the others as PeerFailure); inside megatron's save the
    failing rank raises it, and the launcher or the failure notice ends its peers with it
    (see models/checkpoint.py).
    """
    with publishing_checkpoint(out, overwrite, tag=tag) as tmp:
        write_model_checkpoint(model, tmp)
        if dist.get_rank() == 0:
            write_metadata(tmp)
    return out


def build_stage_model(cfg: ModelConfig, seed: int = 0):
    """This rank's pipeline-stage ``GPTModel`` at the layout of megatron's parallel state."""
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(),
                              ps.get_pipeline_model_parallel_world_size())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(cfg, parallel)


def _module_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters of a bare GPTModel by state-dict name (TE extra state and empty biases out)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state") and v.numel() > 0}


def _layer_offset(model) -> int:
    layers = list(model.decoder.layers)
    if not layers:
        return 0
    offset = layers[0].layer_number - 1
    numbers = [layer.layer_number for layer in layers]
    if numbers != list(range(offset + 1, offset + 1 + len(layers))):
        raise ValueError(f"pipeline stage holds non-contiguous layers {numbers}")
    return offset


def _check_hf_names(weights: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    expected = {h for b in bindings_for(cfg).values() for h in b.hf}
    present = set(weights.names)
    missing = sorted(expected - present)
    if missing:
        raise KeyError(f"HF checkpoint {weights.directory} lacks {len(missing)} tensor(s) the "
                       f"config implies, e.g. {missing[:5]}")
    unexpected = sorted(n for n in present - expected
                        if not n.endswith(_IGNORED_SUFFIXES)
                        # tied models may still store lm_head; the embedding is the weight used
                        and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise ValueError(f"HF checkpoint {weights.directory} has {len(unexpected)} tensor(s) "
                         f"with no place in the megatron model, e.g. {unexpected[:5]}; the "
                         "architecture has features this converter does not map")


def _fill_from_hf(model, cfg: ModelConfig, weights: SafetensorsCheckpoint) -> None:
    """Copy every parameter of this rank's model (its TP shard) from the HF tensors."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    padded = cfg.padded_vocab_size(tp_size)
    params = _module_tensors(model)
    spec = detect_spec(params)
    bindings = bindings_for(cfg, spec)
    offset = _layer_offset(model)
    for local_name, param in params.items():
        name = global_layer_name(local_name, offset)
        if name not in bindings:
            raise KeyError(f"megatron parameter {local_name!r} (global {name!r}, {spec} spec) "
                           "has no HF mapping; mapped names look like "
                           f"{sorted(bindings)[:3]}")
        binding = bindings[name]
        full = to_megatron(binding, [weights.get(h) for h in binding.hf], cfg, padded)
        shard = tp_shard(binding, full, tp_rank, tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{local_name}: HF tensors give shard shape {tuple(shard.shape)}, "
                             f"the model holds {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
              params_dtype: str | None = None) -> Path:
    """Convert an HF Llama/Qwen2/Qwen3 directory into a megatron checkpoint at this layout.

    Collective over every rank. ``params_dtype`` defaults to the stored weights' dtype
    (float16 is widened to float32). The checkpoint's padded vocabulary is that of the current
    tensor-parallel size: train at a TP size that pads to the same number of rows.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_output_dir(out, overwrite)
    hf_config = read_json(hf_dir / "config.json", "the HF model's config")
    source = str(hf_dir / "config.json")
    arch = architecture_of(hf_config, source)
    weights = SafetensorsCheckpoint(hf_dir)
    stored = weights.dtype_of("model.embed_tokens.weight")
    if params_dtype is None:
        try:
            params_dtype = params_dtype_for(stored)
        except ValueError as err:
            raise ValueError(f"{hf_dir}: {err}") from None
    cfg = model_config_from_hf(hf_config, params_dtype, source)
    _check_hf_names(weights, cfg)

    model = build_stage_model(cfg)
    _fill_from_hf(model, cfg, weights)
    return save_with_metadata(
        model, out, overwrite, "import",
        lambda tmp: write_model_metadata(tmp, cfg, hf_architecture=arch, hf_dtype=stored,
                                         hf_config=hf_config, tokenizer_src=hf_dir))


# ---------------------------------------------------------------------------------------------
# Reading megatron checkpoints.

def checkpoint_prefix(ckpt_dir: str | os.PathLike, which: str | None = None) -> str:
    """State-dict prefix of the model to read: ``""`` (single-model checkpoint) or
    ``"strong."`` / ``"weak."`` (joint checkpoint; ``which`` defaults to ``strong``)."""
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(str(ckpt_dir)).keys()
    joint = any(k.startswith("strong.") for k in keys)
    if not joint:
        if which is not None:
            raise ValueError(f"{ckpt_dir} is a single-model checkpoint; which={which!r} applies "
                             "to joint (strong/weak) checkpoints only")
        return ""
    which = which or "strong"
    if which not in ("strong", "weak"):
        raise ValueError(f"which must be 'strong' or 'weak', got {which!r}")
    return f"{which}."


def checkpoint_padded_vocab(ckpt_dir: str | os.PathLike, prefix: str = "") -> int:
    """Rows of the (padded) embedding stored in a megatron checkpoint."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    key = prefix + _EMBEDDING
    if key not in meta:
        raise KeyError(f"{ckpt_dir}: no tensor {key!r} (keys look like {sorted(meta)[:3]})")
    return int(meta[key].global_shape[0])


def model_for_checkpoint(cfg: ModelConfig, padded_vocab: int, ckpt_dir: str = "") -> ModelConfig:
    """``cfg`` with the vocabulary padding rule changed so that, at the current
    tensor-parallel size, the model has exactly ``padded_vocab`` rows (the checkpoint's)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if padded_vocab < cfg.vocab_size or padded_vocab % tp:
        raise ValueError(f"checkpoint {ckpt_dir} has {padded_vocab} vocabulary rows, which "
                         f"cannot hold vocab_size={cfg.vocab_size} split over "
                         f"tensor_model_parallel_size={tp}")
    return dataclasses.replace(cfg, make_vocab_size_divisible_by=padded_vocab // tp)


def load_checkpoint_model(ckpt_dir: str | os.PathLike, which: str | None = None,
                          model_from: str | os.PathLike | None = None):
    """``(model, cfg)``: this rank's stage of the model stored in ``ckpt_dir`` (single-model,
    or the ``which`` half of a joint checkpoint), built at the current megatron layout with
    the checkpoint's vocabulary padding, weights loaded (resharded as needed), in eval mode.
    Collective over the model-parallel group. ``model_from``: where the model description is
    when ``ckpt_dir`` has none."""
    cfg = read_model_metadata(model_from or ckpt_dir).model
    prefix = checkpoint_prefix(ckpt_dir, which)
    cfg = model_for_checkpoint(cfg, checkpoint_padded_vocab(ckpt_dir, prefix), str(ckpt_dir))
    model = build_stage_model(cfg)
    load_model_checkpoint(model, ckpt_dir, prefix)
    model.eval()
    return model, cfg


def hf_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors of a full (TP=1, PP=1) ``GPTModel``, vocabulary un-padded, in model order."""
    params = _module_tensors(model)
    bindings = bindings_for(cfg, detect_spec(params))
    out: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        if name not in bindings:
            raise KeyError(f"megatron parameter {name!r} has no HF mapping")
        binding = bindings[name]
        for hf_name, tensor in zip(binding.hf, to_hf(binding, param.detach(), cfg), strict=True):
            if hf_name in out and not torch.equal(out[hf_name], tensor):
                raise ValueError(f"{hf_name} gets two different values (tied weights diverged)")
            out[hf_name] = tensor
    expected = {h for b in bindings.values() for h in b.hf}
    if set(out) != expected:
        raise ValueError(f"export produced {sorted(set(out) ^ expected)[:5]} unlike the "
                         "mapping; is the model a full TP=1/PP=1 model?")
    return out


def _load_for_export(ckpt_dir: Path, which: str | None, model_from: str | None):
    meta = read_model_metadata(model_from or ckpt_dir)
    prefix = checkpoint_prefix(ckpt_dir, which)
    padded = checkpoint_padded_vocab(ckpt_dir, prefix)
    cfg = model_for_checkpoint(meta.model, padded, str(ckpt_dir))
    model = build_stage_model(cfg)
    load_model_checkpoint(model, ckpt_dir, prefix=prefix)
    return meta, model, cfg


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              which: str | None = None, overwrite: bool = False,
              max_shard_size: int | str = "5GB", dtype: str | None = None,
              model_from: str | os.PathLike | None = None) -> Path:
    """Write a megatron checkpoint (single, or one half of a joint one) as an HF model.

    Collective; needs tensor- and pipeline-parallel size 1. ``dtype`` defaults to the dtype of
    the HF weights originally imported (else the model's). ``model_from`` names a directory
    holding the model description when ``ckpt_dir`` has none (see metadata.py).
    """
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise ValueError(f"export_hf runs at tensor/pipeline parallel size 1/1 (it reshards on "
                         f"load), got {tp}/{pp}")
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    check_output_dir(out, overwrite)
    meta, model, cfg = _load_for_export(ckpt, which, model_from and str(model_from))
    dtype = dtype or meta.hf_dtype or cfg.params_dtype
    out_dtype = torch_dtype(dtype)  # ValueError naming the supported ones
    if meta.hf_config is not None:
        # The original config, verbatim but for the dtype actually written.
        hf_config = dict(meta.hf_config)
        architecture_of(hf_config)
        for key in [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["dtype"]:
            hf_config[key] = dtype
    else:
        arch = meta.hf_architecture or _default_architecture(cfg)
        hf_config = hf_config_from_model_config(meta.model, arch, dtype)

    def write_hf() -> None:
        tensors = {k: v.to(out_dtype) for k, v in hf_state_dict(model, cfg).items()}
        with publishing_directory(out, overwrite) as tmp:
            write_safetensors(tensors, tmp, max_shard_size)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if meta.tokenizer_dir is not None:
                copy_tokenizer_files(meta.tokenizer_dir, tmp)

    on_rank_zero(write_hf, f"export to {out}", share=False)
    return out


def _default_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that expresses ``cfg``'s flags (models that never came from HF)."""
    if cfg.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if cfg.add_qkv_bias else "LlamaForCausalLM"


def extract_megatron(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     which: str = "strong", overwrite: bool = False,
                     model_from: str | os.PathLike | None = None) -> Path:
    """Write one model of a joint checkpoint as a single-model megatron checkpoint.

    Collective at any layout; the result reshards like any checkpoint and keeps the joint
    checkpoint's padded vocabulary and model description.
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    check_output_dir(out, overwrite)
    if which not in ("strong", "weak"):
        raise ValueError(f"which must be 'strong' or 'weak', got {which!r}")
    meta_dir = Path(model_from) if model_from else ckpt
    _, model, _ = _load_for_export(ckpt, which, str(meta_dir))
    return save_with_metadata(model, out, overwrite, "extract",
                              lambda tmp: copy_model_metadata(meta_dir, tmp))
