"""Hugging Face ⇄ megatron-core parameter names and tensor layouts (Llama, Qwen2/2.5, Qwen3).

One table describes the decoder family; rows carry a flag where a tensor exists only for some
members (QKV bias: Qwen2; q/k norm: Qwen3; separate ``lm_head``: untied models). Each row gives
the megatron name, the HF tensor(s) it is made of, how they combine (``layout``) and how the
full megatron tensor is split over tensor-parallel ranks (``tp_split``).

Megatron names exist in two spellings. The local spec (CPU) has standalone
``input_layernorm`` / ``pre_mlp_layernorm`` modules; the Transformer Engine spec fuses them into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``. Module state dicts use the
spelling of the spec that built them, so :func:`detect_spec` picks the table by the keys a built
model actually has. (megatron's *distributed checkpoints* always use the TE spelling: the local
spec maps its keys, so a checkpoint written on CPU loads on GPU and back.)

Shape legend: H hidden, F ffn (per SwiGLU branch), d head_dim, n query heads, g query groups
(key/value heads), V vocab (HF), Vp padded vocab, t tensor-parallel size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_wmss.config import ModelConfig

__all__ = [
    "DECODER_TABLE",
    "SPECS",
    "Binding",
    "TableRow",
    "bindings_for",
    "detect_spec",
    "global_layer_name",
    "merge_qkv",
    "split_qkv",
    "tp_shard",
    "to_hf",
    "to_megatron",
]

SPECS = ("local", "te")
_LAYOUTS = ("same", "qkv", "gate_up", "vocab")
_TP_SPLITS = ("replicated", "dim0", "dim1", "gate_up")


@dataclass(frozen=True)
class TableRow:
    """One megatron tensor; ``{i}`` stands for the (global) layer index."""

    megatron: str
    """Name in a local-spec ``GPTModel.state_dict()``."""
    hf: tuple[str, ...]
    """HF tensors it is made of, in the order ``layout`` combines them."""
    layout: str
    """same | qkv (interleave q, k, v per query group) | gate_up (concat) | vocab (pad rows)."""
    tp_split: str
    """replicated | dim0 (column parallel, vocab) | dim1 (row parallel) | gate_up."""
    when: str | None = None
    """ModelConfig condition: qkv_bias, qk_norm, tied, untied, or None (always)."""
    te: str | None = None
    """Name in a Transformer Engine spec model, where it differs."""


_L, _H = "decoder.layers.{i}.", "model.layers.{i}."

# The Llama / Qwen2 / Qwen3 decoder: pre-norm RMSNorm, GQA attention with RoPE, SwiGLU MLP.
DECODER_TABLE: tuple[TableRow, ...] = (
    TableRow("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "dim0"),
    TableRow(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "same",
             "replicated", te=_L + "self_attention.linear_qkv.layer_norm_weight"),
    TableRow(_L + "self_attention.linear_qkv.weight",
             tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv", "dim0"),
    TableRow(_L + "self_attention.linear_qkv.bias",
             tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", "dim0",
             when="qkv_bias"),
    TableRow(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), "same",
             "replicated", when="qk_norm"),
    TableRow(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), "same",
             "replicated", when="qk_norm"),
    TableRow(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "same",
             "dim1"),
    TableRow(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "same",
             "replicated", te=_L + "mlp.linear_fc1.layer_norm_weight"),
    TableRow(_L + "mlp.linear_fc1.weight",
             (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up", "gate_up"),
    TableRow(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "same", "dim1"),
    TableRow("decoder.final_layernorm.weight", ("model.norm.weight",), "same", "replicated"),
    TableRow("output_layer.weight", ("lm_head.weight",), "vocab", "dim0", when="untied"),
    # Tied models have no lm_head tensor; a pipeline's last stage still holds its own copy of
    # the embedding as output_layer.weight (megatron keeps it in sync through the embedding group).
    TableRow("output_layer.weight", ("model.embed_tokens.weight",), "vocab", "dim0", when="tied"),
)


def _condition(cfg: ModelConfig, when: str | None) -> bool:
    conditions = {None: True, "qkv_bias": cfg.add_qkv_bias, "qk_norm": cfg.qk_layernorm,
                  "tied": cfg.tie_word_embeddings, "untied": not cfg.tie_word_embeddings}
    return conditions[when]


@dataclass(frozen=True)
class Binding:
    """A table row resolved for one layer of one model: concrete names, no placeholders."""

    megatron: str
    hf: tuple[str, ...]
    layout: str
    tp_split: str


def bindings_for(cfg: ModelConfig, spec: str = "local",
                 table: Sequence[TableRow] = DECODER_TABLE) -> dict[str, Binding]:
    """Megatron name (global layer index, ``spec`` spelling) -> Binding, for every tensor."""
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {list(SPECS)}, got {spec!r}")
    out: dict[str, Binding] = {}
    for row in table:
        if row.layout not in _LAYOUTS or row.tp_split not in _TP_SPLITS:
            raise ValueError(f"mapping row {row.megatron}: layout {row.layout!r} / tp_split "
                             f"{row.tp_split!r} not in {_LAYOUTS} / {_TP_SPLITS}")
        if not _condition(cfg, row.when):
            continue
        name = row.te if (spec == "te" and row.te) else row.megatron
        for i in range(cfg.num_layers) if "{i}" in name else [0]:
            concrete = name.format(i=i)
            out[concrete] = Binding(concrete, tuple(h.format(i=i) for h in row.hf), row.layout,
                                    row.tp_split)
    return out


def detect_spec(names: Iterable[str]) -> str:
    """``"te"`` when the model's keys use Transformer Engine's fused-norm names, else ``"local"``.

    Only the fused layer norms tell the two apart; a pipeline stage without layers (never the
    case for our builder) would read as ``local``, which names the same non-layer tensors.
    """
    te_marks = (".linear_qkv.layer_norm_weight", ".linear_fc1.layer_norm_weight")
    local_marks = (".input_layernorm.weight", ".pre_mlp_layernorm.weight")
    names = list(names)
    te = any(n.endswith(te_marks) for n in names)
    local = any(n.endswith(local_marks) for n in names)
    if te and local:
        raise ValueError("model state dict mixes Transformer Engine fused-norm names and local "
                         "layer-norm names; cannot tell which spec built it")
    return "te" if te else "local"


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_layer_name(name: str, layer_offset: int) -> str:
    """Rewrite a stage-local ``decoder.layers.{j}.`` name to the global layer index j+offset."""
    match = _LAYER_RE.match(name)
    if match is None:
        return name
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{name[match.end():]}"


# ---------------------------------------------------------------------------------------------
# Layouts: HF tensors <-> one full (unsplit) megatron tensor.

def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig
              ) -> torch.Tensor:
    """HF q ``[n·d, *r]``, k, v ``[g·d, *r]`` -> megatron ``[g·(n/g + 2)·d, *r]``.

    megatron's fused QKV stores, for each query group, that group's n/g query heads, then its
    key head, then its value head; splitting dim 0 contiguously over t ranks therefore hands
    each rank whole groups. ``*r`` is ``[H]`` for the weight and empty for the bias.
    """
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    rest = q.shape[1:]
    _expect(q, (cfg.num_attention_heads * d, *rest), "q_proj")
    _expect(k, (g * d, *rest), "k_proj")
    _expect(v, (g * d, *rest), "v_proj")
    groups = [q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(groups, dim=1).reshape(g * (per + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`merge_qkv`: megatron ``[g·(n/g + 2)·d, *r]`` -> (q, k, v)."""
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    rest = qkv.shape[1:]
    _expect(qkv, (g * (per + 2) * d, *rest), "linear_qkv")
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def to_megatron(binding: Binding, hf: Sequence[torch.Tensor], cfg: ModelConfig,
                padded_vocab: int) -> torch.Tensor:
    """The full megatron tensor of ``binding`` from its HF tensors (vocab padded with zeros)."""
    if binding.layout == "same":
        return hf[0]
    if binding.layout == "qkv":
        return merge_qkv(*hf, cfg)
    if binding.layout == "gate_up":
        gate, up = hf
        _expect(gate, (cfg.ffn_hidden_size, cfg.hidden_size), binding.hf[0])
        _expect(up, (cfg.ffn_hidden_size, cfg.hidden_size), binding.hf[1])
        return torch.cat([gate, up], dim=0)  # [2F, H]
    emb = hf[0]
    _expect(emb, (cfg.vocab_size, cfg.hidden_size), binding.hf[0])
    # Padding rows are zero: their logits are exactly 0 and they are never a target.
    pad = emb.new_zeros(padded_vocab - cfg.vocab_size, emb.shape[1])
    return torch.cat([emb, pad], dim=0)  # [Vp, H]


def to_hf(binding: Binding, full: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """HF tensors (in ``binding.hf`` order) from a full megatron tensor; drops vocab padding."""
    if binding.layout == "same":
        return (full,)
    if binding.layout == "qkv":
        return split_qkv(full, cfg)
    if binding.layout == "gate_up":
        _expect(full, (2 * cfg.ffn_hidden_size, cfg.hidden_size), binding.megatron)
        gate, up = full.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()
    if full.shape[0] < cfg.vocab_size:
        raise ValueError(f"{binding.megatron} has {full.shape[0]} rows, fewer than "
                         f"vocab_size={cfg.vocab_size}")
    return (full[: cfg.vocab_size].contiguous(),)


def tp_shard(binding: Binding, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full megatron tensor.

    dim0: ColumnParallelLinear outputs, vocab rows, fused QKV (whole query groups per rank);
    dim1: RowParallelLinear inputs; gate_up: gate and up are split separately and each rank
    holds ``[gate_r; up_r]`` (what megatron's SwiGLU expects of a local fc1 shard).
    """
    if binding.tp_split == "replicated" or size == 1:
        return full
    if binding.tp_split == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([_slice(gate, 0, rank, size, binding), _slice(up, 0, rank, size,
                                                                      binding)], dim=0)
    return _slice(full, 0 if binding.tp_split == "dim0" else 1, rank, size, binding)


def _slice(t: torch.Tensor, dim: int, rank: int, size: int, binding: Binding) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{binding.megatron}: dim {dim} of size {t.shape[dim]} does not split "
                         f"over tensor_model_parallel_size={size}")
    step = t.shape[dim] // size
    return t.narrow(dim, rank * step, step)


def _expect(t: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} from the model config, got "
                         f"{tuple(t.shape)}")
