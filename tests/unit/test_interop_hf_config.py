"""HF config.json ⇄ ModelConfig: field mapping, both transformers spellings, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_wmss.config import ModelConfig
from megatron_wmss.interop.hf_config import (
    SUPPORTED_ARCHITECTURES,
    hf_config_from_model_config,
    hf_dtype,
    model_config_from_hf,
)

# transformers-4 style configs, as the public Qwen3-4B-Base, Qwen2.5-3B and Llama-3-8B
# config.json files spell them (rope_theta at the top level, torch_dtype).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": None,
    "vocab_size": 151936,
}
QWEN25_3B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
    "use_sliding_window": False, "max_window_layers": 70, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "vocab_size": 151936,
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "mlp_bias": False, "pretraining_tp": 1,
    "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_qwen3_4b_base():
    cfg = model_config_from_hf(QWEN3_4B)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (36, 2560, 9728)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim) == (32, 8, 128)
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.tie_word_embeddings
    assert cfg.rotary_base == 1e6 and cfg.norm_epsilon == 1e-6
    assert cfg.params_dtype == "bfloat16" and cfg.vocab_size == 151936
    # 151936 = 1187·128: no padding at TP 1, 128 rows at TP 2.
    assert cfg.padded_vocab_size(1) == 151936 and cfg.padded_vocab_size(2) == 152064


def test_qwen25_has_qkv_bias_and_llama3_neither_bias_nor_qk_norm():
    qwen = model_config_from_hf(QWEN25_3B)
    assert qwen.add_qkv_bias and not qwen.qk_layernorm and qwen.head_dim == 128
    assert qwen.num_query_groups == 2 and qwen.tie_word_embeddings
    llama = model_config_from_hf(LLAMA3_8B)
    assert not llama.add_qkv_bias and not llama.qk_layernorm and not llama.tie_word_embeddings
    assert llama.rotary_base == 500000.0 and llama.norm_epsilon == 1e-5


def test_transformers5_spelling_is_read():
    hf = {k: v for k, v in QWEN3_4B.items() if k not in ("rope_theta", "rope_scaling",
                                                        "torch_dtype")}
    hf.update(rope_parameters={"rope_type": "default", "rope_theta": 5e6}, dtype="float32")
    cfg = model_config_from_hf(hf)
    assert cfg.rotary_base == 5e6 and cfg.params_dtype == "float32"
    assert hf_dtype({"dtype": "float16"}) == "float16"
    assert model_config_from_hf({**hf, "dtype": "float16"}).params_dtype == "float32"
    assert model_config_from_hf(hf, params_dtype="bfloat16").params_dtype == "bfloat16"


@pytest.mark.parametrize("field,value,needle", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "'llama3'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "'linear'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "'yarn'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=true"),
    ("mlp_bias", True, "mlp_bias=true"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("layer_types", ["full_attention", "sliding_attention"], "sliding_attention"),
    ("rope_theta", 10000.5, "whole number"),
    ("rope_parameters", {"full_attention": {"rope_theta": 1e4}}, "per-layer-type"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
])
def test_unsupported_features_are_refused_by_name(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        model_config_from_hf({**LLAMA3_8B, field: value}, source="x/config.json")


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError) as err:
        model_config_from_hf({**LLAMA3_8B, "architectures": ["MistralForCausalLM"]})
    message = str(err.value)
    assert "MistralForCausalLM" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_missing_field_is_named():
    hf = dict(LLAMA3_8B)
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="'intermediate_size' is missing"):
        model_config_from_hf(hf)


@pytest.mark.parametrize("arch,flags", [
    ("LlamaForCausalLM", {}),
    ("Qwen2ForCausalLM", {"add_qkv_bias": True}),
    ("Qwen3ForCausalLM", {"qk_layernorm": True, "head_dim": 32, "tie_word_embeddings": True}),
])
def test_synthesized_config_round_trips_and_transformers_reads_it(arch, flags):
    from transformers import AutoConfig

    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=2, vocab_size=300, rotary_base=1e6, norm_epsilon=1e-5,
                      max_position_embeddings=128, params_dtype="float32", **flags)
    hf = hf_config_from_model_config(cfg, arch)
    assert dataclasses.asdict(model_config_from_hf(hf)) == dataclasses.asdict(cfg)
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    loaded = AutoConfig.for_model(hf["model_type"], **fields)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    assert loaded.num_key_value_heads == 2 and loaded.tie_word_embeddings == cfg.tie_word_embeddings


def test_synthesized_config_refuses_an_architecture_that_cannot_express_the_model():
    cfg = ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                      vocab_size=10, qk_layernorm=True)
    with pytest.raises(ValueError, match="qk_layernorm"):
        hf_config_from_model_config(cfg, "LlamaForCausalLM")
    with pytest.raises(ValueError, match="supported architectures"):
        hf_config_from_model_config(cfg, "GPT2LMHeadModel")
