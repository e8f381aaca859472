"""The chunked linear mixed cross-entropy on real gloo groups (TP 1/2) against autograd of a
naive full-vocabulary fp64 implementation and against the unfused vocab-parallel loss.

Each rank builds the same hidden states and full output weights, keeps its vocab shard of the
weights, and runs the chunked loss over megatron's tensor-parallel group with tiles (a chunk
of tokens by a block of columns) that leave a remainder both ways. Hidden gradients are complete (summed over the group); weight
gradients are this rank's shard.
"""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.testing import run_distributed

H_S, H_W, VOCAB, REAL_VOCAB, TOKENS, CHUNK, BLOCK = 24, 16, 256, 230, (3, 7), 5, 37
# fp32 against fp64: summation order only. bf16 against the unfused loss: both round the
# logits and their gradient to bf16 at the same points; the weight gradients differ by the
# order of bf16 partial products (chunks), a few bf16 ulps of the largest entry.
FP32_ATOL, BF16_RTOL, BF16_ATOL = 1e-5, 2.0 ** -6, 2e-3


def _case(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(*TOKENS, H_S, generator=gen)
    hw = torch.randn(*TOKENS, H_W, generator=gen)
    ws = 0.5 * torch.randn(VOCAB, H_S, generator=gen)
    ww = 0.5 * torch.randn(VOCAB, H_W, generator=gen)
    ws[REAL_VOCAB:] = 1e4  # padded rows: must never matter
    ww[REAL_VOCAB:] = float("nan")
    target = torch.randint(0, REAL_VOCAB, TOKENS, generator=gen)
    target[torch.rand(TOKENS, generator=gen) < 0.25] = -100
    grad = torch.rand(TOKENS, generator=gen)
    return [x.to(dtype) for x in (hs, hw, ws, ww)], target, grad


def _naive(hs, hw, ws, ww, target, lam, tied_tokens=None):
    """fp64 autograd over the real vocabulary; ``tied_tokens``: the strong hidden states are
    also looked up from ``ws`` (a tied embedding) and added to ``hs``."""
    ws_real, ww_real = ws[:REAL_VOCAB], ww[:REAL_VOCAB]
    if tied_tokens is not None:
        hs = hs + ws_real[tied_tokens]
    z = lam * hs @ ws_real.T + (1 - lam) * hw @ ww_real.T if lam not in (0.0, 1.0) else (
        hs @ ws_real.T if lam == 1.0 else hw @ ww_real.T)
    return torch.nn.functional.cross_entropy(z.reshape(-1, REAL_VOCAB), target.reshape(-1),
                                             ignore_index=-100, reduction="none").view(TOKENS)


def _excess(got, want, atol, rtol=0.0):
    got, want = got.detach().double(), want.detach().double()
    return float(((got - want).abs() - (atol + rtol * want.abs())).max())


def _check():
    from megatron.core import parallel_state as ps

    import importlib

    from megatron_wmss.loss import mixed_cross_entropy
    from megatron_wmss.loss.linear_cross_entropy import (linear_cross_entropy,
                                                         linear_mixed_cross_entropy)

    # Tiles of CHUNK tokens x 37 columns: several vocab blocks per shard, the last one partial
    # (the online log-sum-exp and the per-block target lookup), padded columns in their own
    # blocks at TP=2 (rank 1 holds 102 real columns of 128).
    module = importlib.import_module("megatron_wmss.loss.linear_cross_entropy")
    module._TILE_ELEMENTS = CHUNK * BLOCK
    assert module.vocab_block_size(CHUNK, 230) == BLOCK

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    v = VOCAB // tp
    shard = slice(rank * v, (rank + 1) * v)
    excess, failures = {}, []

    def leaves(tensors, frozen=()):
        return [t.clone().requires_grad_(i not in frozen) for i, t in enumerate(tensors)]

    for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
        (hs, hw, ws, ww), target, grad = _case(seed, dtype)
        for lam in (0.0, 0.5, 1.0):
            for frozen in ((), (1, 3), (0, 2)):  # nothing; the weak model; the strong one
                key = f"{dtype} lam{lam} frozen{frozen}"
                mine = leaves([hs, hw, ws[shard], ww[shard]], frozen)
                loss = linear_mixed_cross_entropy(*mine, target, lam, tp_group=group,
                                                  vocab_size=REAL_VOCAB, chunk_size=CHUNK)
                loss.backward(grad)
                for i, t in enumerate(mine):
                    if (t.grad is None) != (i in frozen):
                        failures.append(f"{key}: input {i} grad presence wrong")
                    elif t.grad is not None and t.grad.dtype != dtype:
                        failures.append(f"{key}: input {i} grad dtype {t.grad.dtype}")
                for i in (2, 3):  # padded vocabulary rows get exactly zero gradient
                    g = mine[i].grad
                    if g is not None and torch.count_nonzero(
                            g[max(REAL_VOCAB - rank * v, 0):]):
                        failures.append(f"{key}: padded rows of input {i} got gradient")
                if dtype == torch.float32:
                    ref = leaves([x.double() for x in (hs, hw, ws, ww)])
                    want = _naive(*ref, target, lam)
                    want.backward(grad.double())
                    excess[f"{key} loss vs naive"] = _excess(loss, want.detach(), FP32_ATOL)
                    for i, t in enumerate(mine):
                        if t.grad is not None:
                            w = torch.zeros_like(ref[i]) if ref[i].grad is None else ref[i].grad
                            w = w if i < 2 else w[shard]  # unread at λ ∈ {0, 1}: gradient 0
                            excess[f"{key} grad{i} vs naive"] = _excess(t.grad, w, FP32_ATOL)
                # The unfused loss on explicit logits (hidden gradients summed over the group).
                ref = leaves([hs, hw, ws[shard], ww[shard]], frozen)
                unfused = mixed_cross_entropy(ref[0] @ ref[2].T, ref[1] @ ref[3].T, target, lam,
                                              tp_group=group, vocab_size=REAL_VOCAB)
                unfused.backward(grad)
                for t in ref[:2]:
                    if t.grad is not None:
                        torch.distributed.all_reduce(t.grad, group=group)
                rtol, atol = (0.0, FP32_ATOL) if dtype == torch.float32 else (BF16_RTOL,
                                                                              BF16_ATOL)
                excess[f"{key} loss vs unfused"] = _excess(loss, unfused.detach(), FP32_ATOL)
                for i, (t, u) in enumerate(zip(mine, ref)):
                    if t.grad is not None:
                        excess[f"{key} grad{i} vs unfused"] = _excess(t.grad, u.grad, atol, rtol)

    # SFT loss and tied embeddings (fp32): the output weight is also the input embedding.
    (hs, hw, ws, ww), target, grad = _case(7, torch.float32)
    tokens = torch.randint(0, REAL_VOCAB, TOKENS, generator=torch.Generator().manual_seed(3))
    emb_full = ws.clone()
    emb_shard = emb_full[shard].clone().requires_grad_()
    h_in = hs.clone().requires_grad_()
    # The vocab-parallel embedding lookup: each rank adds the rows it holds, then a SUM.
    local = tokens - rank * v
    held = (local >= 0) & (local < v)
    looked_up = torch.where(held[..., None], emb_shard[local.clamp(0, v - 1)], 0.0)
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    hidden = h_in + reduce_from_tensor_model_parallel_region(looked_up)
    loss = linear_cross_entropy(hidden, emb_shard, target, tp_group=group,
                                vocab_size=REAL_VOCAB, chunk_size=CHUNK)
    loss.backward(grad)
    ref = [hs.double().requires_grad_(), emb_full.double().requires_grad_()]
    want = _naive(ref[0], hw.double(), ref[1], ww.double(), target, 1.0, tied_tokens=tokens)
    want.backward(grad.double())
    excess["tied loss"] = _excess(loss, want.detach(), FP32_ATOL)
    excess["tied grad hidden"] = _excess(h_in.grad, ref[0].grad, FP32_ATOL)
    excess["tied grad embedding"] = _excess(emb_shard.grad, ref[1].grad[shard], FP32_ATOL)
    return excess, failures


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_loss_matches_naive_and_unfused(tp):
    for rank, (excess, failures) in enumerate(run_distributed(_check, world_size=tp, tp=tp,
                                                              timeout=300)):
        assert not failures, f"tp={tp} rank={rank}: {failures}"
        # 2 dtypes x 3 λ x 3 freezings; fp32 also against naive; + the tied case.
        assert len(excess) > 60 and {"tied loss", "tied grad embedding"} <= set(excess)
        over = {k: v for k, v in excess.items() if v > 0}
        assert not over, f"tp={tp} rank={rank} out of tolerance by: {over}"
