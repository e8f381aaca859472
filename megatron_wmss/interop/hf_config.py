"""HF ``config.json`` ⇄ :class:`ModelConfig` for the supported causal-LM architectures.

Works on the raw JSON dict (never through ``AutoConfig``: no remote code, and both the
transformers 4 spelling — ``rope_theta``, ``rope_scaling``, ``torch_dtype`` — and the
transformers 5 one — ``rope_parameters``, ``dtype`` — are read). Anything the megatron model
would compute differently is refused with the field, its value and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_wmss.config import ModelConfig, dtype_name, params_dtype_for

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "architecture_of",
    "hf_config_from_model_config",
    "hf_dtype",
    "model_config_from_hf",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """What one HF architecture fixes about the decoder (beyond the common config fields)."""

    model_type: str
    qkv_bias: bool | None
    """True: always (Qwen2); False: never; None: read ``attention_bias``, which must be false
    (Llama and Qwen3 put it on q, k, v AND o, and megatron biases only QKV)."""
    qk_norm: bool


SUPPORTED_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": ArchitectureSpec("llama", qkv_bias=None, qk_norm=False),
    "Qwen2ForCausalLM": ArchitectureSpec("qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": ArchitectureSpec("qwen3", qkv_bias=None, qk_norm=True),
}

# HF defaults of fields that configs may omit (values of the transformers config classes).
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_EPS = 1e-6


def architecture_of(hf: dict[str, Any], source: str = "config.json") -> str:
    """The single supported entry of ``architectures``; ValueError listing the supported ones."""
    archs = hf.get("architectures") or []
    supported = sorted(SUPPORTED_ARCHITECTURES)
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: architectures={archs!r} is not supported; supported "
                         f"architectures: {supported}")
    return archs[0]


def hf_dtype(hf: dict[str, Any]) -> str | None:
    """The declared weight dtype (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    value = hf.get("dtype", hf.get("torch_dtype"))
    return dtype_name(value) if value is not None else None


def _require(hf: dict, name: str, source: str):
    if name not in hf or hf[name] is None:
        raise ValueError(f"{source}: required field {name!r} is missing")
    return hf[name]


def _rope_base(hf: dict, source: str) -> float:
    """RoPE theta; refuses every scaling variant (only plain RoPE is implemented)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    for field, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict) or any(isinstance(v, dict) for v in value.values()):
            raise ValueError(f"{source}: {field}={value!r} is not supported; supported: null "
                             "or one flat dict (per-layer-type RoPE settings are refused)")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"{source}: {field} rope type {kind!r} is not implemented (linear, dynamic, "
                "yarn, longrope, llama3 and other scaled RoPE variants are refused); "
                "supported: 'default' (plain RoPE) or no rope_scaling")
        theta = value.get("rope_theta", theta)
    partial = (params or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported; "
                         "supported: 1.0 (RoPE on every channel)")
    theta = float(_DEFAULT_ROPE_THETA if theta is None else theta)
    # The model builder passes the base to megatron as an int.
    if not math.isfinite(theta) or theta <= 0 or theta != int(theta):
        raise ValueError(f"{source}: rope_theta={theta!r} must be a positive whole number")
    return theta


def _check_unsupported(hf: dict, arch: str, source: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported; supported: 'silu' "
                         "(SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported (megatron model has no "
                         "MLP bias); supported: false")
    if SUPPORTED_ARCHITECTURES[arch].qkv_bias is None and hf.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true ({arch} adds it to o_proj too) is not "
                         "supported; supported: false")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported; supported: false")
    layer_types = hf.get("layer_types")
    if layer_types and set(layer_types) != {"full_attention"}:
        raise ValueError(f"{source}: layer_types={sorted(set(layer_types))} is not supported; "
                         "supported: every layer 'full_attention'")
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; "
                         "supported: 1")


def model_config_from_hf(hf: dict[str, Any], params_dtype: str | None = None,
                         source: str = "config.json") -> ModelConfig:
    """ModelConfig of the HF model described by ``hf`` (the parsed config.json).

    ``params_dtype`` defaults to the config's dtype: bfloat16 stays bfloat16, float32 stays
    float32, float16 becomes float32 (lossless; ModelConfig has no float16).
    """
    arch = architecture_of(hf, source)
    spec = SUPPORTED_ARCHITECTURES[arch]
    _check_unsupported(hf, arch, source)
    heads = int(_require(hf, "num_attention_heads", source))
    hidden = int(_require(hf, "hidden_size", source))
    if params_dtype is None:
        params_dtype = params_dtype_for(hf_dtype(hf) or "bfloat16")
    qkv_bias = spec.qkv_bias if spec.qkv_bias is not None else False
    return ModelConfig(
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size", source)),
        num_attention_heads=heads,
        vocab_size=int(_require(hf, "vocab_size", source)),
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=int(_require(hf, "max_position_embeddings", source)),
        rotary_base=_rope_base(hf, source),
        norm_epsilon=float(hf.get("rms_norm_eps", _DEFAULT_EPS)),
        qk_layernorm=spec.qk_norm,
        add_qkv_bias=qkv_bias,
        # The Llama/Qwen2/Qwen3 config classes default to untied (and write the field out).
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=params_dtype,
    )


def hf_config_from_model_config(cfg: ModelConfig, architecture: str,
                                dtype: str | None = None) -> dict[str, Any]:
    """A config.json for ``cfg`` as ``architecture`` (models that never came from HF).

    Raises when the architecture cannot express ``cfg`` (e.g. q/k norm as Llama).
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; supported "
                         f"architectures: {sorted(SUPPORTED_ARCHITECTURES)}")
    spec = SUPPORTED_ARCHITECTURES[architecture]
    if cfg.qk_layernorm != spec.qk_norm:
        raise ValueError(f"ModelConfig.qk_layernorm={cfg.qk_layernorm} cannot be expressed as "
                         f"{architecture} (which has qk norm: {spec.qk_norm})")
    if cfg.add_qkv_bias != bool(spec.qkv_bias):
        raise ValueError(f"ModelConfig.add_qkv_bias={cfg.add_qkv_bias} cannot be expressed as "
                         f"{architecture} (which has QKV bias: {bool(spec.qkv_bias)})")
    dtype = dtype or cfg.params_dtype
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": spec.model_type,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_method_std,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if spec.qkv_bias is None:
        out["attention_bias"] = False
    if spec.model_type == "llama":
        out["mlp_bias"] = False
    else:
        out["use_sliding_window"] = False
    return out
