"""Model/parallel/mix configuration: validation, TE and FP8 selection, the λ schedule."""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.config import (
    MixConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    check_same_architecture,
)
from megatron_wmss.models import layer_spec, transformer_config_kwargs, use_transformer_engine


def tiny(**changes) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=300, params_dtype="float32")
    base.update(changes)
    return ModelConfig(**base)


@pytest.mark.parametrize("tp,field", [(4, "num_query_groups"), (8, "num_attention_heads"),
                                      (5, "num_attention_heads")])
def test_tensor_parallel_must_divide_heads_and_groups(tp, field):
    with pytest.raises(ValueError, match=rf"tensor_model_parallel_size={tp} must divide "
                                         rf"ModelConfig\.{field}"):
        tiny().check_parallel(ParallelConfig(tensor_model_parallel_size=tp))


def test_tensor_parallel_must_divide_ffn():
    cfg = tiny(ffn_hidden_size=90, num_query_groups=4)
    with pytest.raises(ValueError, match=r"must divide ModelConfig\.ffn_hidden_size=90"):
        cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=4))


def test_pipeline_parallel_must_divide_layers():
    with pytest.raises(ValueError, match=r"pipeline_model_parallel_size=3 must divide "
                                         r"ModelConfig\.num_layers=4"):
        tiny().check_parallel(ParallelConfig(pipeline_model_parallel_size=3))
    with pytest.raises(ValueError, match="must divide"):
        transformer_config_kwargs(tiny(), ParallelConfig(pipeline_model_parallel_size=3),
                                  use_te=False)


@pytest.mark.parametrize("field,value", [("vocab_size", 301), ("num_layers", 2),
                                         ("hidden_size", 128), ("qk_layernorm", True),
                                         ("tie_word_embeddings", True)])
def test_strong_and_weak_must_share_the_architecture(field, value):
    with pytest.raises(ValueError, match=rf"strong and weak models differ in {field}"):
        check_same_architecture(tiny(), tiny(**{field: value}))
    check_same_architecture(tiny(), tiny(params_dtype="bfloat16"))  # numerics may differ


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), True])
def test_mix_lambda_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"MixConfig\.mix_lambda must be in \[0, 1\]"):
        MixConfig(mix_lambda=bad)


def test_lambda_ramp_is_linear_then_constant():
    mix = MixConfig(mix_lambda=0.5, lambda_start=1.0, lambda_ramp_steps=4)
    assert [mix.lambda_at(s) for s in range(6)] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    assert MixConfig(mix_lambda=0.42).lambda_at(1000) == 0.42
    with pytest.raises(ValueError, match="lambda_start is required"):
        MixConfig(lambda_ramp_steps=3)


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"ModelConfig\.num_attention_heads=4 must be a multiple "
                                         r"of num_query_groups=3"):
        tiny(num_query_groups=3)
    with pytest.raises(ValueError, match=r"ModelConfig\.fp8 must be one of"):
        tiny(fp8="e5m2")
    with pytest.raises(ValueError, match=r"ModelConfig\.params_dtype must be one of"):
        tiny(params_dtype="float16")
    with pytest.raises(ValueError, match=r"OptimConfig\.min_lr"):
        OptimConfig(lr=1e-5, min_lr=1e-4)
    with pytest.raises(ValueError, match="sequence_parallel needs"):
        ParallelConfig(sequence_parallel=True)


def test_vocab_is_padded_for_tensor_parallelism():
    assert tiny().padded_vocab_size(1) == 384
    assert tiny().padded_vocab_size(4) == 512


def test_transformer_engine_is_chosen_only_when_usable():
    assert use_transformer_engine(tiny(), te_usable=True) is True
    assert use_transformer_engine(tiny(), te_usable=False) is False
    assert use_transformer_engine(tiny(transformer_impl="local"), te_usable=True) is False
    with pytest.raises(RuntimeError, match="Transformer Engine is not usable"):
        use_transformer_engine(tiny(transformer_impl="transformer_engine"), te_usable=False)
    with pytest.raises(RuntimeError, match="fp8='hybrid' needs Transformer Engine"):
        use_transformer_engine(tiny(fp8="hybrid"), te_usable=False)
    with pytest.raises(ValueError, match="fp8 needs transformer_impl"):
        tiny(fp8="e4m3", transformer_impl="local")


def test_fp8_settings_map_onto_megatron_transformer_config():
    cfg = tiny(fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=16,
               fp8_amax_compute_algo="most_recent", fp8_margin=1, params_dtype="bfloat16")
    kw = transformer_config_kwargs(cfg, ParallelConfig(2, 2), use_te=True, on_cuda=True,
                                   has_apex=True)
    assert (kw["fp8"], kw["fp8_recipe"], kw["fp8_amax_history_len"],
            kw["fp8_amax_compute_algo"], kw["fp8_margin"]) == (
        "hybrid", "tensorwise", 16, "most_recent", 1)
    assert kw["bf16"] and kw["params_dtype"] == torch.bfloat16
    assert kw["gradient_accumulation_fusion"] and kw["bias_activation_fusion"]
    assert kw["calculate_per_token_loss"]
    # Without FP8 no fp8 key reaches megatron, and CPU runs get no CUDA fusions.
    kw = transformer_config_kwargs(tiny(), ParallelConfig(), use_te=False, on_cuda=False)
    assert "fp8" not in kw
    assert not (kw["gradient_accumulation_fusion"] or kw["masked_softmax_fusion"]
                or kw["apply_rope_fusion"] or kw["bias_activation_fusion"])
    with pytest.raises(ValueError, match="needs the Transformer Engine spec"):
        transformer_config_kwargs(tiny(fp8="e4m3"), ParallelConfig(), use_te=False)


def test_qwen_and_llama_features_map_onto_megatron():
    kw = transformer_config_kwargs(tiny(qk_layernorm=True, add_qkv_bias=True, head_dim=32),
                                   ParallelConfig(), use_te=False, on_cuda=False)
    assert kw["qk_layernorm"] and kw["add_qkv_bias"] and kw["kv_channels"] == 32
    assert kw["normalization"] == "RMSNorm" and kw["gated_linear_unit"]
    assert kw["num_query_groups"] == 2 and not kw["add_bias_linear"]


def test_local_spec_is_megatron_local_modules():
    spec = layer_spec(tiny(qk_layernorm=True), use_te=False)
    attention = spec.submodules.self_attention.submodules
    assert "transformer_engine" not in repr(spec)
    assert attention.q_layernorm is not None


def test_apex_fusions_are_requested_only_where_apex_exists():
    # CUDA + TE without Apex: megatron's output layer would ask Apex for its fused wgrad GEMM,
    # and the local spec's fused softmax is an Apex kernel too.
    kw = transformer_config_kwargs(tiny(), ParallelConfig(), use_te=True, on_cuda=True,
                                   has_apex=False)
    assert not kw["gradient_accumulation_fusion"] and not kw["masked_softmax_fusion"]
    assert kw["bias_activation_fusion"] and kw["apply_rope_fusion"]
    kw = transformer_config_kwargs(tiny(), ParallelConfig(), use_te=False, on_cuda=True,
                                   has_apex=True)
    assert kw["masked_softmax_fusion"] and not kw["gradient_accumulation_fusion"]


def test_sequence_parallel_local_spec_norms_mark_their_weights_for_the_tp_reduction():
    from megatron.core.transformer import TransformerConfig

    from megatron_wmss.models import SequenceParallelRMSNorm

    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    for use_te in (False, True):
        assert transformer_config_kwargs(tiny(), parallel, use_te=use_te)["sequence_parallel"]
    # megatron's own local spec refuses sequence parallelism in its torch norm wrapper.
    layer = layer_spec(tiny(qk_layernorm=True), use_te=False, sequence_parallel=True).submodules
    attention = layer.self_attention.submodules
    assert layer.input_layernorm is layer.pre_mlp_layernorm is SequenceParallelRMSNorm
    assert attention.q_layernorm is attention.k_layernorm is SequenceParallelRMSNorm
    plain = layer_spec(tiny(qk_layernorm=True), use_te=False).submodules
    assert plain.input_layernorm is not SequenceParallelRMSNorm
    # finalize_model_grads sums over TP the gradients of parameters marked sequence_parallel.
    for sp in (True, False):
        tc = TransformerConfig(**transformer_config_kwargs(
            tiny(), ParallelConfig(2, sequence_parallel=sp), use_te=False, on_cuda=False))
        norm = SequenceParallelRMSNorm(tc, hidden_size=64, eps=1e-6)
        assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
        assert [getattr(p, "sequence_parallel", None) for p in norm.parameters()] == [sp]


def test_optimizer_and_mix_options_that_would_be_ignored_are_rejected():
    with pytest.raises(ValueError, match=r"OptimConfig\.adam_eps must be > 0"):
        OptimConfig(adam_eps=0.0)
    with pytest.raises(ValueError, match="lambda_start has no effect"):
        MixConfig(lambda_start=0.9)


@pytest.mark.parametrize("weak_changes,optim,freeze,match", [
    ({"params_dtype": "bfloat16"}, {}, False, "differ in params_dtype"),
    ({"num_layers": 2}, {}, False, "differ in num_layers"),
    ({}, {"weak_lr": 1e-4}, True, "weak_lr=0.0001 has no effect"),
])
def test_joint_setup_rejects_inconsistent_models_before_building(weak_changes, optim, freeze,
                                                                 match):
    from megatron_wmss.training import setup_training

    # Raised before megatron's parallel state is consulted: no process group is needed.
    with pytest.raises(ValueError, match=match):
        setup_training(tiny(), ParallelConfig(), OptimConfig(**optim), 3,
                       mix=MixConfig(freeze_weak=freeze), weak_cfg=tiny(**weak_changes))


def test_dropout_reaches_megatron_and_stays_out_of_checkpoint_descriptions(tmp_path):
    from megatron_wmss.interop.metadata import read_model_metadata, write_model_metadata

    kw = transformer_config_kwargs(tiny(hidden_dropout=0.1, attention_dropout=0.2),
                                   ParallelConfig(), use_te=False, on_cuda=False)
    assert (kw["hidden_dropout"], kw["attention_dropout"]) == (0.1, 0.2)
    # A run started from the checkpoint (or evaluating it) does not inherit a training setting.
    write_model_metadata(tmp_path, tiny(hidden_dropout=0.1, attention_dropout=0.2))
    stored = read_model_metadata(tmp_path).model
    assert (stored.hidden_dropout, stored.attention_dropout) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"ModelConfig\.hidden_dropout must be a probability "
                                         r"in \[0, 1\), got 1\.0"):
        tiny(hidden_dropout=1.0)
