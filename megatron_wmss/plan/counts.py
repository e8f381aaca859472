"""Exact parameter counts of one rank of a GPT model, from its :class:`ModelConfig` alone.

The planner counts parameters analytically instead of building the model on the meta device:
megatron-core reads its tensor/pipeline sizes from initialised process groups (a fake group
needs torch's internal test backend), its layers allocate on ``torch.cuda.current_device()``
unless ``use_cpu_initialization`` is set, tied embeddings call ``.cuda()`` on the last
pipeline stage, and Transformer Engine allocates on its own device. The formulas below are
the model :func:`megatron_wmss.models.build_gpt_model` builds (local and Transformer Engine
specs have the same parameters: TE keeps each norm's weight inside the following linear);
``tests/unit/test_plan.py`` checks them against the built model's ``numel`` at TP 1 and 2 and
PP 2, tied and untied, with and without q/k norms and QKV bias.

Per layer (``h`` hidden, ``a`` heads, ``g`` KV groups, ``d`` head dim, ``f`` SwiGLU width,
``t`` tensor-parallel size; no linear biases)::

    input norm h + QKV h·(a + 2g)·d/t [+ (a + 2g)·d/t bias] + [q/k norms 2d]
    + output projection a·d·h/t + MLP norm h + fc1 h·2f/t + fc2 f·h/t

The first pipeline stage adds the embedding ``V_pad/t × h``; the last the final norm ``h``
and the output layer ``V_pad/t × h``, which a tied model has only when PP > 1 (the last
stage's copy of the embedding). ``V_pad`` is the vocabulary padded to a multiple of
``make_vocab_size_divisible_by × t``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_wmss.config import ModelConfig, ParallelConfig

__all__ = ["StageParameters", "layer_parameters", "stage_parameters"]


@dataclass(frozen=True)
class StageParameters:
    """Parameters one rank of pipeline stage ``stage`` holds of one model (elements)."""

    embedding: int
    layers: int
    """All transformer layers of this stage."""
    final_norm: int
    output_layer: int
    largest: int
    """Elements of the largest single parameter (its gradient is the largest transient)."""
    layers_in_stage: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output_layer


def layer_parameters(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """One transformer layer's parameters on one tensor-parallel rank, by module."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d // tp
    return {
        "input_norm": h,
        "linear_qkv": h * qkv_out,
        "linear_qkv_bias": qkv_out if cfg.add_qkv_bias else 0,
        "qk_norms": 2 * d if cfg.qk_layernorm else 0,
        "linear_proj": cfg.num_attention_heads * d // tp * h,
        "pre_mlp_norm": h,
        "linear_fc1": h * 2 * f // tp,
        "linear_fc2": f // tp * h,
    }


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> StageParameters:
    """Exact parameter count of one rank of pipeline stage ``stage`` (0-based) at TP ``tp``."""
    if not 0 <= stage < pp:
        raise ValueError(f"pipeline stage {stage} is outside [0, {pp})")
    cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                      pipeline_model_parallel_size=pp))
    first, last = stage == 0, stage == pp - 1
    vocab_rows = cfg.padded_vocab_size(tp) // tp
    per_layer = layer_parameters(cfg, tp)
    n_layers = cfg.num_layers // pp
    embedding = vocab_rows * cfg.hidden_size if first else 0
    has_output = last and (not cfg.tie_word_embeddings or pp > 1)
    output = vocab_rows * cfg.hidden_size if has_output else 0
    sizes = list(per_layer.values()) + [embedding, output]
    return StageParameters(embedding=embedding, layers=n_layers * sum(per_layer.values()),
                           final_norm=cfg.hidden_size if last else 0, output_layer=output,
                           largest=max(sizes), layers_in_stage=n_layers)

