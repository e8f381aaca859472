"""The HF ⇄ megatron name table and tensor layouts, checked on hand-labelled tensors."""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.config import ModelConfig
from megatron_wmss.interop.mapping import (
    Binding,
    bindings_for,
    detect_spec,
    global_layer_name,
    merge_qkv,
    split_qkv,
    to_hf,
    to_megatron,
    tp_shard,
)


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4,
                num_query_groups=2, head_dim=2, vocab_size=10, params_dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


def _labelled(base: int, rows: int, cols: int = 3) -> torch.Tensor:
    """Row r holds base + r in every column: the row's origin is readable from its value."""
    return (base + torch.arange(rows, dtype=torch.float32))[:, None].expand(rows, cols).clone()


def test_fused_qkv_interleaves_heads_per_query_group():
    cfg = _cfg()  # 4 query heads in 2 groups, head_dim 2
    q, k, v = _labelled(100, 8), _labelled(200, 4), _labelled(300, 4)
    rows = merge_qkv(q, k, v, cfg)[:, 0].tolist()
    # group 0: query heads 0-1, key head 0, value head 0; then group 1 likewise.
    assert rows == [100, 101, 102, 103, 200, 201, 300, 301,
                    104, 105, 106, 107, 202, 203, 302, 303]
    back = split_qkv(merge_qkv(q, k, v, cfg), cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))
    bias = merge_qkv(q[:, 0], k[:, 0], v[:, 0], cfg)  # 1-D bias: same interleaving
    assert bias.tolist() == rows


def test_contiguous_tp_split_of_fused_qkv_gives_whole_query_groups():
    cfg = _cfg(num_attention_heads=8, num_query_groups=4)
    q, k, v = _labelled(0, 16), _labelled(100, 8), _labelled(200, 8)
    binding = Binding("qkv", ("q", "k", "v"), "qkv", "dim0")
    full = merge_qkv(q, k, v, cfg)
    half = _cfg(num_attention_heads=4, num_query_groups=2)
    for rank in range(2):
        # Rank r's shard is the fused layout of query groups 2r, 2r+1 alone.
        want = merge_qkv(q[8 * rank:8 * rank + 8], k[4 * rank:4 * rank + 4],
                         v[4 * rank:4 * rank + 4], half)
        assert torch.equal(tp_shard(binding, full, rank, 2), want)


def test_swiglu_fc1_shards_hold_their_slice_of_gate_and_up():
    cfg = _cfg(ffn_hidden_size=4, hidden_size=3)
    gate, up = _labelled(0, 4), _labelled(10, 4)
    binding = bindings_for(cfg)["decoder.layers.0.mlp.linear_fc1.weight"]
    full = to_megatron(binding, [gate, up], cfg, padded_vocab=16)
    assert full[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert tp_shard(binding, full, 1, 2)[:, 0].tolist() == [2, 3, 12, 13]
    back = to_hf(binding, full, cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, (gate, up), strict=True))


def test_row_and_column_parallel_splits():
    cfg = _cfg()
    binding = bindings_for(cfg)
    w = torch.arange(24.0).reshape(4, 6)
    proj = binding["decoder.layers.1.self_attention.linear_proj.weight"]
    assert torch.equal(tp_shard(proj, w, 1, 2), w[:, 3:])
    norm = binding["decoder.final_layernorm.weight"]
    assert tp_shard(norm, w, 1, 2) is w
    with pytest.raises(ValueError, match="does not split"):
        tp_shard(proj, w, 0, 4)


def test_vocab_rows_are_zero_padded_and_unpadded():
    cfg = _cfg()
    emb = torch.randn(10, 8)
    binding = bindings_for(cfg)["embedding.word_embeddings.weight"]
    full = to_megatron(binding, [emb], cfg, padded_vocab=16)
    assert full.shape == (16, 8) and torch.equal(full[:10], emb)
    assert not full[10:].any()
    assert torch.equal(tp_shard(binding, full, 1, 2), full[8:])
    assert torch.equal(to_hf(binding, full, cfg)[0], emb)
    with pytest.raises(ValueError, match=r"expected shape \(10, 8\)"):
        to_megatron(binding, [torch.randn(9, 8)], cfg, padded_vocab=16)


def test_table_follows_model_flags():
    llama = bindings_for(_cfg())
    assert llama["output_layer.weight"].hf == ("lm_head.weight",)
    assert not any("bias" in n or "q_layernorm" in n for n in llama)
    qwen2 = bindings_for(_cfg(add_qkv_bias=True))
    assert qwen2["decoder.layers.1.self_attention.linear_qkv.bias"].hf == tuple(
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv")
    qwen3 = bindings_for(_cfg(qk_layernorm=True, tie_word_embeddings=True))
    assert qwen3["decoder.layers.0.self_attention.k_layernorm.weight"].hf == (
        "model.layers.0.self_attn.k_norm.weight",)
    assert qwen3["output_layer.weight"].hf == ("model.embed_tokens.weight",)
    hf_names = {h for b in qwen3.values() for h in b.hf}
    assert "lm_head.weight" not in hf_names
    assert len(hf_names) == 1 + 2 * 11 + 1  # embed, 11 per layer, final norm


def test_transformer_engine_names_fuse_the_layer_norms():
    cfg = _cfg(qk_layernorm=True)
    local, te = bindings_for(cfg, "local"), bindings_for(cfg, "te")
    assert len(local) == len(te)
    assert te["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"].hf == (
        "model.layers.1.input_layernorm.weight",)
    assert te["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"].hf == (
        "model.layers.0.post_attention_layernorm.weight",)
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
    assert detect_spec(te) == "te" and detect_spec(local) == "local"
    with pytest.raises(ValueError, match="mixes"):
        detect_spec(list(te) + list(local))
    with pytest.raises(ValueError, match="spec must be one of"):
        bindings_for(cfg, "apex")


def test_stage_local_layer_names_become_global():
    assert global_layer_name("decoder.layers.0.mlp.linear_fc2.weight", 2) == \
        "decoder.layers.2.mlp.linear_fc2.weight"
    assert global_layer_name("output_layer.weight", 2) == "output_layer.weight"
