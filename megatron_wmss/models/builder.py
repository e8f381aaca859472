"""Build megatron-core ``GPTModel``s from a :class:`ModelConfig`.

The Transformer Engine layer spec (and FP8) is used where CUDA and TE are present, megatron's
local spec otherwise. The output layer is megatron's own ``ColumnParallelLinear`` in both cases,
outside the FP8 region, and logits go to the fp32 losses of :mod:`megatron_wmss.loss`.

Sequence parallelism runs with both specs. megatron's local spec refuses it (its torch norm
wrapper asserts it off), so with it every norm of the local spec, the final one included, is
:class:`SequenceParallelRMSNorm`: torch's RMSNorm whose weight carries megatron's
``sequence_parallel`` attribute, which makes ``finalize_model_grads`` sum its gradient (a
partial sum over this rank's slice of the sequence) over the tensor-parallel group, as it does
for Transformer Engine's and Apex's norms. The linear layers do the sequence all-gather and
reduce-scatter themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_wmss.config import ModelConfig, ParallelConfig, torch_dtype
from megatron_wmss.platform import apex_available, cuda_available, te_available

__all__ = [
    "SequenceParallelRMSNorm",
    "build_gpt_model",
    "layer_spec",
    "transformer_config",
    "transformer_config_kwargs",
    "use_transformer_engine",
]


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built as megatron builds its norms (``config``, ``hidden_size``,
    ``eps``), its weight marked ``sequence_parallel`` when ``config.sequence_parallel`` is on.

    With sequence parallelism each tensor-parallel rank normalises its own ``[s/tp, b, h]``
    slice, so the weight's gradient is a partial sum; megatron's ``finalize_model_grads``
    all-reduces (SUM) over the tensor-parallel group every parameter so marked. Numerically
    the module of megatron's ``WrappedTorchNorm`` (same class, initialisation and state dict).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm, got TransformerConfig."
                             f"normalization={config.normalization!r}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        for param in self.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))


def use_transformer_engine(cfg: ModelConfig, te_usable: Optional[bool] = None) -> bool:
    """Whether layers use Transformer Engine; ``te_usable`` overrides detection (for tests)."""
    usable = te_available() if te_usable is None else te_usable
    if cfg.transformer_impl == "local":
        return False
    if cfg.transformer_impl == "transformer_engine" and not usable:
        raise RuntimeError("ModelConfig.transformer_impl='transformer_engine' but Transformer "
                           "Engine is not usable here (it needs CUDA and transformer_engine); "
                           "use 'auto' or 'local'")
    if cfg.fp8 is not None and not usable:
        raise RuntimeError(f"ModelConfig.fp8={cfg.fp8!r} needs Transformer Engine on CUDA; set "
                           "fp8: null to train without FP8")
    return usable


def transformer_config_kwargs(cfg: ModelConfig, parallel: ParallelConfig, *, use_te: bool,
                              on_cuda: Optional[bool] = None,
                              has_apex: Optional[bool] = None,
                              recompute: str = "none") -> dict:
    """Keyword arguments of megatron-core's ``TransformerConfig`` for ``cfg`` at this layout.

    A plain dict so the mapping (FP8 included) is testable where TE cannot be imported.
    Fusions that need CUDA kernels are enabled only on CUDA; dropout is ``cfg``'s (off by
    default: SFT-style fine-tuning, and bit-comparable runs across layouts; with dropout a
    resume is exact at the same layout only). ``calculate_per_token_loss`` makes
    megatron's schedule and gradient finalization weight every supervised token equally across
    micro-batches and data-parallel ranks.
    """
    cfg.check_parallel(parallel)
    dtype = torch_dtype(cfg.params_dtype)
    on_cuda = cuda_available() if on_cuda is None else on_cuda
    has_apex = apex_available() if has_apex is None else has_apex
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_softmax_in_fp32=True,
        calculate_per_token_loss=True,
        bias_activation_fusion=on_cuda,
        bias_dropout_fusion=on_cuda,
        # Apex kernels: the local spec's fused softmax, and the fused weight-gradient GEMM
        # that megatron's own output layer uses even next to Transformer Engine layers.
        masked_softmax_fusion=on_cuda and has_apex,
        apply_rope_fusion=use_te,
        gradient_accumulation_fusion=use_te and has_apex,
        persist_layer_norm=False,
    )
    if recompute == "selective":  # core attention only: the cheap-to-redo, large activations
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":  # every layer's input is kept, the rest recomputed
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if cfg.fp8 is not None:
        if not use_te:
            raise ValueError(f"ModelConfig.fp8={cfg.fp8!r} needs the Transformer Engine spec")
        # FP8 covers the transformer layers only: megatron's output layer is a plain
        # ColumnParallelLinear outside TE's fp8 autocast, and the losses upcast to fp32.
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe, fp8_margin=cfg.fp8_margin,
                      fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo=cfg.fp8_amax_compute_algo)
    return kwargs


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, *, use_te: bool,
                       recompute: str = "none"):
    """megatron-core ``TransformerConfig`` for ``cfg`` (see :func:`transformer_config_kwargs`)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(cfg, parallel, use_te=use_te,
                                                         recompute=recompute))


def layer_spec(cfg: ModelConfig, use_te: bool, sequence_parallel: bool = False):
    """The transformer-layer ``ModuleSpec``: Transformer Engine's, or megatron's local one
    (with ``sequence_parallel``, its norms are :class:`SequenceParallelRMSNorm`)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    if sequence_parallel:
        layer, attention = spec.submodules, spec.submodules.self_attention.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelRMSNorm
        if cfg.qk_layernorm:  # per-head norms: megatron sums their gradients over TP anyway
            attention.q_layernorm = attention.k_layernorm = SequenceParallelRMSNorm
    return spec


def _decoder_spec(cfg: ModelConfig, tc, use_te: bool):
    """What ``GPTModel`` takes as its ``transformer_layer_spec``: the layer spec, or, for the
    local spec under sequence parallelism, the block of this stage's layers with a
    :class:`SequenceParallelRMSNorm` final norm (megatron would pick its torch norm wrapper,
    which refuses sequence parallelism)."""
    spec = layer_spec(cfg, use_te, tc.sequence_parallel)
    if use_te or not tc.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tc),
                                      layer_norm=SequenceParallelRMSNorm)


def _cast_parameters(model, dtype) -> None:
    """Every parameter in ``dtype``, as Megatron-LM's ``Float16Module`` casts its model: torch's
    norms (megatron's wrapper of them, our :class:`SequenceParallelRMSNorm`) are built in fp32
    whatever ``params_dtype`` says, and megatron's fp16/bf16 optimizer expects every parameter
    in half precision (its checkpoint's state dict fails on an fp32 one). The norms still
    compute in fp32 (torch's RMSNorm upcasts its input on CPU; TE's norms are built in dtype)."""
    for param in model.parameters():
        if param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)


def build_gpt_model(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    use_te: Optional[bool] = None,
    recompute: str = "none",
):
    """One ``GPTModel`` for this rank's pipeline stage, on the default device; its loss covers
    the ``cfg.vocab_size`` real vocabulary columns only (:class:`WMSSGPTModel`).

    Call after megatron's parallel state and ``model_parallel_cuda_manual_seed`` are set up.
    ``recompute``: activation recomputation, none | selective | full.
    ``pre_process`` / ``post_process`` default to whether this rank holds the first / last
    pipeline stage.
    """
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron_wmss.models.gpt import WMSSGPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    te = use_transformer_engine(cfg) if use_te is None else use_te
    tc = transformer_config(cfg, parallel, use_te=te, recompute=recompute)
    model = WMSSGPTModel(
        real_vocab_size=cfg.vocab_size,
        config=tc,
        transformer_layer_spec=_decoder_spec(cfg, tc, te),
        vocab_size=cfg.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
    )
    # megatron's schedules read ``model_type`` from the model (Megatron-LM's get_model sets it).
    model.model_type = ModelType.encoder_or_decoder
    model.uses_te = te
    _cast_parameters(model, tc.params_dtype)
    if cuda_available():
        model.cuda(torch.cuda.current_device())
    return model
