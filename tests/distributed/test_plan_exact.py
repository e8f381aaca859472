"""``wmss plan``'s formulas against the models megatron builds, exactly.

- Parameters per rank (``plan/counts.py``) equal the built model's ``numel`` on every rank of
  TP 1, TP 2 and PP 2, tied and untied, with and without q/k norms, QKV bias and GQA.
- Activations (``plan/activations.py``, local layer spec): the bytes of every storage autograd
  saves for backward during a forward (counted once each, parameters excluded, through
  ``torch.autograd.graph.saved_tensors_hooks``) equal ``layer_bytes`` per layer (the
  difference of a 2-layer and a 1-layer model) and ``head_bytes`` for the rest, for fp32 and
  bf16, no / selective / full recompute, q/k norms, grouped and plain attention, chunked and
  unfused loss, at TP 1 and 2. No tolerance: the formulas count bytes, and so does the hook.
"""

from __future__ import annotations

import itertools

from megatron_wmss.testing import run_distributed

SEQ, BATCH = 32, 2


def _config(layers=2, dtype="float32", qk=True, heads=4, groups=2, tie=False, bias=False):
    from megatron_wmss.config import ModelConfig

    return ModelConfig(num_layers=layers, hidden_size=64, ffn_hidden_size=96,
                       num_attention_heads=heads, num_query_groups=groups, head_dim=16,
                       vocab_size=300, max_position_embeddings=SEQ, params_dtype=dtype,
                       qk_layernorm=qk, tie_word_embeddings=tie, add_qkv_bias=bias)


def _count_rank(variants: list[dict], tp: int, pp: int) -> list[tuple]:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.models import build_gpt_model
    from megatron_wmss.plan.counts import stage_parameters

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    stage = ps.get_pipeline_model_parallel_rank()
    out = []
    for variant in variants:
        cfg = _config(**variant)
        model = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=tp,
                                                    pipeline_model_parallel_size=pp))
        built = [p.numel() for p in model.parameters()]
        planned = stage_parameters(cfg, tp, pp, stage)
        out.append((variant, stage, sum(built), planned.total, max(built), planned.largest))
    return out


VARIANTS = [dict(), dict(tie=True), dict(qk=False, bias=True), dict(heads=4, groups=4),
            dict(tie=True, qk=False, heads=8, groups=2)]


def test_parameter_counts_equal_the_built_models_at_tp1_tp2_pp2():
    for world, tp, pp in ((1, 1, 1), (2, 2, 1), (2, 1, 2)):
        for rank in run_distributed(_count_rank, world, tp=tp, pp=pp, args=(VARIANTS, tp, pp)):
            for variant, stage, built, planned, built_max, planned_max in rank:
                where = f"tp={tp} pp={pp} stage {stage} {variant}"
                assert planned == built, where
                assert planned_max == built_max, where


def _saved_bytes(model, cfg) -> int:
    import torch

    from megatron_wmss.training.step import causal_attention_mask

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, causal_attention_mask(SEQ, "cpu"), labels=labels)
    return sum(seen.values())


def _activation_rank(cases: list[tuple], tp: int) -> list[tuple]:
    from megatron.core import tensor_parallel

    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.models import build_gpt_model
    from megatron_wmss.plan.activations import Shape, head_bytes, layer_bytes

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    out = []
    for dtype, recompute, qk, (heads, groups), loss in cases:
        saved = []
        for layers in (1, 2):
            cfg = _config(layers, dtype, qk, heads, groups)
            model = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=tp),
                                    recompute=recompute)
            model.set_cross_entropy(loss)
            saved.append(_saved_bytes(model, cfg))
        shape = Shape(cfg, tp, SEQ, BATCH)
        # Besides the layers and the loss: the int64 tokens and the [1, 1, s, s] bool mask.
        inputs = 8 * BATCH * SEQ + SEQ * SEQ
        out.append(((dtype, recompute, qk, heads, groups, loss),
                    saved[1] - saved[0], sum(layer_bytes(shape, recompute).values()),
                    2 * saved[0] - saved[1], head_bytes(shape, loss, 1, 1, recompute) + inputs))
    return out


CASES = [c for c in itertools.product(("float32", "bfloat16"), ("none", "selective", "full"),
                                      (False, True), ((4, 2), (4, 4)), ("chunked",))
         if not (c[1] == "full" and c[3] == (4, 4))] + [
    ("float32", "none", True, (4, 2), "unfused"), ("bfloat16", "none", False, (4, 2), "unfused")]


def test_activation_formulas_count_exactly_what_autograd_saves():
    wrong = []
    for tp in (1, 2):
        for case, layer, planned_layer, head, planned_head in run_distributed(
                _activation_rank, tp, tp=tp, args=(CASES, tp), timeout=600)[0]:
            if (planned_layer, planned_head) != (layer, head):
                wrong.append((tp, case, "layer", planned_layer, layer, "head", planned_head,
                              head))
    assert not wrong, "\n".join(map(str, wrong))
