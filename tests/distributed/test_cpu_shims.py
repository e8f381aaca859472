"""The megatron-core CPU shims: each is needed, and with all of them megatron computes right.

Every shim has a test that runs the megatron path it targets with that shim skipped and expects
the CUDA failure it exists for; the positive tests run the same paths with every shim and compare
against a reference (TP=2 vs TP=1 logits, PP=2 vs PP=1 loss and grads, plain vs distributed
vs bf16 optimizer, checkpoint round trip). Model: tiny GPT, local (non-TE) spec, rope,
[b, s] = [2, 8].
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_wmss.platform import cpu_shims
from megatron_wmss.testing import DistributedRunError, run_distributed

SEED = 1234
SEQ, BATCH, VOCAB, LAYERS = 8, 2, 128, 2
CLIP_GRAD = 1e-3  # far below the first step's grad norm (~3), so clipping always triggers
# fp32 runs of the same math in another layout differ only by reduction order.
ATOL = 1e-5

# ----------------------------------------------------------------------------------------------
# Helpers run inside the ranks (module level: ranks are spawned).
# ----------------------------------------------------------------------------------------------


def _gpt(share: bool = False, parallel_output: bool = True, **config: Any):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        **{"pipeline_dtype": torch.float32, **config},
    )
    return GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=share, parallel_output=parallel_output,
    )


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens_bs, position_ids_bs, causal mask [1, 1, s, s] (True = masked; megatron's default
    mask is built on "cuda")."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return tokens, positions, mask


def _forward_step(data_iterator, model):
    tokens, positions, mask = next(data_iterator)
    losses_bs = model(tokens, positions, mask, labels=tokens)

    def loss_func(output_bs: torch.Tensor):
        loss = output_bs.float().mean()
        return loss, {"loss": loss.detach()}

    return losses_bs, loss_func


def _train_losses(model, data_seed: int = 0, microbatches: int = 2) -> list[float]:
    """One forward/backward of megatron's schedule; the per-microbatch losses (last stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter([_batch(data_seed)] * microbatches),
        model=model, num_microbatches=microbatches, seq_length=SEQ, micro_batch_size=BATCH,
    )
    return [float(step["loss"]) for step in out]


def _gather_tp(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reinit_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _shim_wrappers() -> dict[str, object]:
    """Objects the shims install; re-applying must leave them as they are."""
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import layers

    return {
        "setup": language_module.LanguageModule.setup_embeddings_and_output_layer,
        "clip": clip_grads.clip_grad_by_total_norm_fp32,
        "view": layers.torch,
        "current_device": layers.torch.cuda.current_device,
    }


# ----------------------------------------------------------------------------------------------
# Rank functions: one per megatron path.
# ----------------------------------------------------------------------------------------------


def tp2_forward_matches_tp1() -> dict[str, Any]:
    """Seeds, GPT forward at TP=2 with gathered logits, then the same weights at TP=1."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    # Re-applying what the harness applied (not the shims a test skipped) changes nothing.
    applied = cpu_shims.applied_shims()
    wrappers = _shim_wrappers()
    reapplied = cpu_shims.apply_cpu_shims(skip=set(cpu_shims.SHIMS) - set(applied))
    idempotent = wrappers == _shim_wrappers() and sorted(reapplied) == applied

    model_parallel_cuda_manual_seed(SEED)
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(4).tolist()  # the model-parallel stream: differs per TP rank
    # The default stream, resumed where it was before the fork: the same on every TP rank.
    dp_stream = torch.rand(4).tolist()

    model_parallel_cuda_manual_seed(SEED)
    model = _gpt(parallel_output=False)
    model_parallel_cuda_manual_seed(SEED)
    twin = _gpt(parallel_output=False)
    same_init = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    qkv_shard = model.decoder.layers[0].self_attention.linear_qkv.weight.flatten()[:4].tolist()

    tokens, positions, mask = _batch()
    with torch.no_grad():
        logits_bsv = model(tokens, positions, mask)  # gathered over TP by megatron
        full = {
            name: _gather_tp(p, p.partition_dim) if getattr(p, "tensor_model_parallel", False)
            else p
            for name, p in model.named_parameters()
        }
    _reinit_parallel(tp=1, pp=1)
    model_parallel_cuda_manual_seed(SEED)
    reference = _gpt()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(full[name])
        ref_logits_bsv = reference(tokens, positions, mask)
    return {
        "idempotent": idempotent,
        "tp_stream": tp_stream, "dp_stream": dp_stream, "same_init": same_init,
        "qkv_shard": qkv_shard,
        "finite": bool(torch.isfinite(logits_bsv).all()),
        "shape": tuple(logits_bsv.shape),
        "max_diff": float((logits_bsv - ref_logits_bsv).abs().max()),
    }


def _shift_layer(name: str, offset: int) -> str:
    """A stage-local parameter name with its layer index made global."""
    layer = re.compile(r"decoder\.layers\.(\d+)\.")
    return layer.sub(lambda m: f"decoder.layers.{int(m[1]) + offset}.", name)


def pp2_tied_matches_pp1() -> dict[str, Any]:
    """PP=2 with tied embeddings: one schedule step, then the same weights and data at PP=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage = ps.get_pipeline_model_parallel_rank()
    model_parallel_cuda_manual_seed(SEED)
    model = _gpt(share=True)
    tied = [None, None]  # the first stage's embedding and the last stage's output weight
    dist.all_gather_object(tied, model.shared_embedding_or_output_weight().detach())
    losses = _train_losses(model)
    offset = stage * (LAYERS // 2)
    local = {
        _shift_layer(name, offset): (p.detach().clone(), p.grad.clone())
        for name, p in model.named_parameters() if name != "output_layer.weight"
    }
    stages = [None, None]
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())

    _reinit_parallel(tp=1, pp=1)
    model_parallel_cuda_manual_seed(SEED)
    reference = _gpt(share=True)
    merged = {**stages[0], **stages[1]}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(merged[name][0])
    ref_losses = _train_losses(reference)
    # Layer grads crossed the p2p backward; the tied embedding's grad is only complete after
    # finalize_model_grads, which this bare (non-DDP) step does not run.
    layer_grad_diff = max(
        float((p.grad - merged[name][1]).abs().max())
        for name, p in reference.named_parameters() if name.startswith("decoder.layers.")
    )
    return {
        "tied_synced": torch.equal(tied[0], tied[1]),
        "losses": losses, "ref_losses": ref_losses, "layer_grad_diff": layer_grad_diff,
    }


def optimizer_step(kinds: tuple[str, ...] = ("plain", "distributed", "bf16")) -> dict[str, Any]:
    """One DDP + Adam step with clipping with each megatron optimizer: plain fp32 (FP32Optimizer),
    distributed (DistributedOptimizer) and bf16 params (Float16OptimizerWithFloat16Params)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    out: dict[str, Any] = {}
    params = {}
    for kind in kinds:
        distributed, bf16 = kind == "distributed", kind == "bf16"
        model_parallel_cuda_manual_seed(SEED)
        dtype = torch.bfloat16 if bf16 else torch.float32
        gpt = _gpt(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
        gpt.config.finalize_model_grads_func = finalize_model_grads  # the DP grad all-reduce
        model = DistributedDataParallel(
            gpt.config,
            DistributedDataParallelConfig(use_distributed_optimizer=distributed),
            Float16Module(gpt.config, gpt) if bf16 else gpt,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=CLIP_GRAD, bf16=bf16,
                            use_distributed_optimizer=distributed),
            [model],
        )
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = _train_losses(model, data_seed=dist.get_rank())  # different data per DP rank
        ok, grad_norm, _ = optimizer.step()
        params[kind] = [p.detach().clone() for p in model.parameters()]
        out[kind] = {
            "ok": ok, "grad_norm": grad_norm, "finite": all(map(math.isfinite, losses)),
            "moved": min(float((a - b).abs().max()) for a, b in zip(params[kind], before)),
        }
        if kind == "plain":  # clipping scaled the grads in place to norm CLIP_GRAD
            out[kind]["clipped_norm"] = optimizer.get_grad_norm()
    if "plain" in params and "distributed" in params:
        out["max_param_diff"] = max(
            float((a - b).abs().max()) for a, b in zip(params["plain"], params["distributed"])
        )
    return out


def checkpoint_round_trip(path: str) -> dict[str, Any]:
    """dist_checkpointing save, then load into a model initialized from another seed."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(SEED)
    model = _gpt()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    model_parallel_cuda_manual_seed(SEED + 1)
    restored = _gpt()
    differed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), path))
    return {
        "differed_before": differed,
        "equal_after": all(
            torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters())
        ),
    }


# ----------------------------------------------------------------------------------------------
# Unit tests (no spawn), with a fake registry so this process's megatron stays untouched.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_registry(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(
        cpu_shims, "SHIMS", {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    )
    monkeypatch.setattr(cpu_shims, "_APPLIED", set())
    return calls


def test_noop_when_cuda_is_available(fake_registry, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_shims.apply_cpu_shims() == []
    assert fake_registry == [] and cpu_shims.applied_shims() == []


def test_apply_is_idempotent_and_honours_skip(fake_registry, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_shims.apply_cpu_shims(skip=("b",)) == ["a", "c"]
    assert cpu_shims.apply_cpu_shims(skip=("b",)) == ["a", "c"]
    assert fake_registry == ["a", "c"]
    assert cpu_shims.apply_cpu_shims() == ["a", "b", "c"]
    assert fake_registry == ["a", "c", "b"]
    assert cpu_shims.applied_shims() == ["a", "b", "c"]


def test_unknown_skip_name_lists_known_shims(fake_registry):
    with pytest.raises(ValueError, match=r"\['nope'\].*\['a', 'b', 'c'\]"):
        cpu_shims.apply_cpu_shims(skip=("a", "nope"))
    assert fake_registry == []


def test_every_shim_documents_its_call_site():
    for name, shim in cpu_shims.SHIMS.items():
        assert shim.__doc__ and "0.16.x" in shim.__doc__ and ".py" in shim.__doc__, name


# ----------------------------------------------------------------------------------------------
# Distributed tests.
# ----------------------------------------------------------------------------------------------


def test_tp2_forward_matches_tp1_and_seeds_are_deterministic():
    r0, r1 = run_distributed(tp2_forward_matches_tp1, 2, tp=2, timeout=180)
    for r in (r0, r1):
        assert r["idempotent"] and r["same_init"] and r["finite"]
        assert r["shape"] == (BATCH, SEQ, VOCAB)
        assert r["max_diff"] < ATOL, r["max_diff"]
    assert r0["tp_stream"] != r1["tp_stream"] and r0["qkv_shard"] != r1["qkv_shard"]
    assert r0["dp_stream"] == r1["dp_stream"]


def test_pp2_tied_embeddings_match_pp1():
    first, last = run_distributed(pp2_tied_matches_pp1, 2, pp=2, timeout=180)
    assert first["tied_synced"]
    assert first["losses"] == [] and len(last["losses"]) == 2  # loss lives on the last stage
    assert all(math.isfinite(x) for x in last["losses"])
    assert last["losses"] == pytest.approx(last["ref_losses"], abs=ATOL)
    assert max(first["layer_grad_diff"], last["layer_grad_diff"]) < ATOL


def test_optimizer_clips_and_distributed_matches_plain():
    for r in run_distributed(optimizer_step, 2, timeout=180):
        for kind in ("plain", "distributed", "bf16"):
            assert r[kind]["ok"] and r[kind]["finite"] and r[kind]["moved"] > 0
            assert r[kind]["grad_norm"] > 10 * CLIP_GRAD  # so clipping ran
        assert r["plain"]["clipped_norm"] == pytest.approx(CLIP_GRAD, rel=1e-4)
        assert r["max_param_diff"] < ATOL
        # bf16 params and activations (8-bit mantissa): the same grad norm to about 1%.
        assert r["bf16"]["grad_norm"] == pytest.approx(r["plain"]["grad_norm"], rel=1e-2)


def test_dist_checkpoint_round_trip(tmp_path):
    results = run_distributed(
        checkpoint_round_trip, 2, tp=2, kwargs={"path": str(tmp_path)}, timeout=180
    )
    assert all(r["differed_before"] and r["equal_after"] for r in results)


_NO_CUDA = "Torch not compiled with CUDA enabled"
# shim, the rank function (and kwargs) whose megatron path needs it, tp, pp, the failure.
NEEDED = [
    ("cuda_rng_on_cpu", tp2_forward_matches_tp1, {}, 2, 1,
     rf"tensor_parallel/random\.py.*{_NO_CUDA}"),
    ("current_device_is_cpu", tp2_forward_matches_tp1, {}, 2, 1,
     rf"tensor_parallel/layers\.py.*{_NO_CUDA}"),
    ("cuda_factories_on_cpu", pp2_tied_matches_pp1, {}, 1, 2, rf"schedules\.py.*{_NO_CUDA}"),
    ("clip_grads_cpu_type_check", optimizer_step, {}, 1, 1,
     r"assert param\.grad\.type\(\) == 'torch\.cuda\.FloatTensor'"),
    ("optimizer_param_type_strings", optimizer_step, {}, 1, 1,
     r"distrib_optimizer\.py.*Wrapped parameters must be one of"),
    ("optimizer_param_type_strings", optimizer_step, {"kinds": ("bf16",)}, 1, 1,
     r"optimizer/optimizer\.py.*Wrapped parameters must be one of"),
    ("tied_embedding_cuda_copy", pp2_tied_matches_pp1, {}, 1, 2,
     rf"weight\.data\.cuda\(\).*{_NO_CUDA}"),
    ("cuda_synchronize_noop", pp2_tied_matches_pp1, {}, 1, 2,
     rf"p2p_communication\.py.*synchronize\(\).*{_NO_CUDA}"),
    ("cuda_synchronize_noop", checkpoint_round_trip, {}, 2, 1,
     rf"filesystem_async\.py.*synchronize\(\).*{_NO_CUDA}"),
]


def test_every_shim_has_a_needed_test():
    assert sorted({row[0] for row in NEEDED}) == sorted(cpu_shims.SHIMS)


@pytest.mark.parametrize(
    "shim, fn, kwargs, tp, pp, error", NEEDED,
    ids=[f"{row[0]}-{row[1].__name__}{'-bf16' if row[2] else ''}" for row in NEEDED],
)
def test_megatron_path_fails_without_shim(shim, fn, kwargs, tp, pp, error, tmp_path):
    if fn is checkpoint_round_trip:
        kwargs = {"path": str(tmp_path)}
    with pytest.raises(DistributedRunError, match=f"(?s){error}"):
        run_distributed(fn, 2, tp=tp, pp=pp, kwargs=kwargs, skip_shims=(shim,), timeout=180)
