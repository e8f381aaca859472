"""Vocab-parallel mixed cross-entropy on real gloo groups (TP 1/2/4) vs a single-process reference.

Each rank builds the same full-vocab case, keeps its vocab shard, runs the vocab-parallel loss
over megatron's tensor-parallel group and compares loss and shard gradients with autograd of the
naive full-vocab implementation computed on that rank. One spawn per TP size runs every case,
since starting gloo ranks dominates the cost.
"""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.testing import DistributedRunError, run_distributed
from megatron_wmss.config.vocab import padded_vocab_size
from tests.naive import make_case, naive_mixed_ce, naive_statistics, pad_columns

# Same budgets as the single-process tests (see tests/unit/test_mixed_cross_entropy.py): the
# shards' partial sums are added in a different order than one full-vocab sum, nothing more.
FP32_LOSS_ATOL, FP32_GRAD_ATOL, BF16_GRAD_RTOL, STATS_TOL = 1e-5, 1e-6, 2.0**-7, 1e-5

VOCAB = 256  # divisible by 1, 2 and 4
TOKENS = (3, 10)
# Real vocabulary under megatron's padding rule (a multiple of 128·TP): 384 columns at TP=1,
# 512 at TP=2 (rank 1 holds 44 real columns) and at TP=4 (rank 2 holds 44, rank 3 none).
REAL_VOCAB = 300


def _shard(x, rank, tp):
    v = x.shape[-1] // tp
    return x[..., rank * v:(rank + 1) * v]


def _max_excess(got, want, atol, rtol):
    """max(|got − want| − (atol + rtol·|want|)): <= 0 means within tolerance."""
    got, want = got.float(), want.float()
    return float(((got - want).abs() - (atol + rtol * want.abs())).max())


def _check_all_cases():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_wmss.loss import mixed_cross_entropy, mixed_logit_diagnostics

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    excess: dict[str, float] = {}

    for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
        strong, weak, target, grad = make_case(seed, TOKENS, VOCAB, dtype)
        grad_rtol = 0.0 if dtype == torch.float32 else BF16_GRAD_RTOL
        for lam in (0.0, 0.3, 0.5, 1.0):
            key = f"{dtype}-lam{lam}"
            s = _shard(strong, rank, tp).clone().requires_grad_()
            w = _shard(weak, rank, tp).clone().requires_grad_()
            s_before, w_before = s.detach().clone(), w.detach().clone()
            loss = mixed_cross_entropy(s, w, target, lam, tp_group=group)
            loss.backward(grad)
            if not (torch.equal(s.detach(), s_before) and torch.equal(w.detach(), w_before)):
                raise AssertionError(f"{key}: inputs modified")
            if s.grad.dtype != dtype or w.grad.dtype != dtype:
                raise AssertionError(f"{key}: gradient dtype {s.grad.dtype}, expected {dtype}")

            s_ref, w_ref = strong.clone().requires_grad_(), weak.clone().requires_grad_()
            ref = naive_mixed_ce(s_ref, w_ref, target, lam)
            ref.backward(grad)
            excess[f"{key} loss"] = _max_excess(loss, ref.detach(), FP32_LOSS_ATOL, 0.0)
            excess[f"{key} grad_strong"] = _max_excess(
                s.grad, _shard(s_ref.grad, rank, tp), FP32_GRAD_ATOL, grad_rtol)
            excess[f"{key} grad_weak"] = _max_excess(
                w.grad, _shard(w_ref.grad, rank, tp), FP32_GRAD_ATOL, grad_rtol)

        # λ = 1 is megatron's own vocab-parallel CE of the strong logits (which has no
        # ignore_index: compare supervised positions only, and hand it a copy, since it
        # overwrites its input in place).
        valid = target != -100
        s32 = _shard(strong, rank, tp).float()
        ours = mixed_cross_entropy(s32, _shard(weak, rank, tp), target, 1.0, tp_group=group)
        theirs = vocab_parallel_cross_entropy(s32.clone(), torch.where(valid, target, 0))
        excess[f"{dtype} lam1 vs megatron"] = _max_excess(
            ours[valid], theirs[valid], FP32_LOSS_ATOL, 0.0)

        stats = mixed_logit_diagnostics(
            _shard(strong, rank, tp), _shard(weak, rank, tp), target, 0.42, tp_group=group)
        mixed = 0.42 * strong.float() + 0.58 * weak.float()
        for name, full in (("strong", strong), ("weak", weak), ("mixed", mixed)):
            for field, want in naive_statistics(full, target).items():
                got = getattr(stats[name], field)
                excess[f"{dtype} stats {name}.{field}"] = _max_excess(
                    got, want, STATS_TOL, STATS_TOL)
    return excess


def _check_real_vocab_cases():
    """Padded logits with ``vocab_size=REAL_VOCAB`` against the naive loss over the real
    vocabulary; padded columns must get exactly zero gradient, and refilling them with large
    values, inf or nan must leave loss and gradients bit for bit unchanged."""
    from megatron.core import parallel_state

    from megatron_wmss.loss import (
        cross_entropy,
        mixed_cross_entropy,
        mixed_logit_diagnostics,
        token_entropy,
    )

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab_size(REAL_VOCAB, tp)
    excess: dict[str, float] = {}
    failures = []
    for seed, dtype in enumerate((torch.float32, torch.bfloat16), start=10):
        strong, weak, target, grad = make_case(seed, TOKENS, REAL_VOCAB, dtype)
        grad_rtol = 0.0 if dtype == torch.float32 else BF16_GRAD_RTOL
        for lam in (0.3, 1.0, "single"):
            key = f"real-vocab {dtype}-lam{lam}"
            s_ref, w_ref = strong.clone().requires_grad_(), weak.clone().requires_grad_()
            ref = naive_mixed_ce(s_ref, w_ref, target, 1.0 if lam == "single" else lam)
            ref.backward(grad)
            first = None
            for fill in ("zeros", "large", "inf", "nan"):
                s = _shard(pad_columns(strong, padded, fill), rank, tp).clone().requires_grad_()
                w = _shard(pad_columns(weak, padded, fill, 1), rank, tp).clone().requires_grad_()
                if lam == "single":
                    loss = cross_entropy(s, target, tp_group=group, vocab_size=REAL_VOCAB)
                else:
                    loss = mixed_cross_entropy(s, w, target, lam, tp_group=group,
                                               vocab_size=REAL_VOCAB)
                loss.backward(grad)
                grads = [g if g is not None else torch.zeros_like(s) for g in (s.grad, w.grad)]
                got = (loss.detach(), *grads)
                if first is None:
                    first = got
                elif not all(torch.equal(a, b) for a, b in zip(got, first)):
                    failures.append(f"{key}: padded columns holding {fill} changed the result")
            loss, gs, gw = first
            real_mask = _shard(torch.arange(padded), rank, tp) < REAL_VOCAB
            for name, g in (("strong", gs), ("weak", gw)):
                if torch.count_nonzero(g[..., ~real_mask]):
                    failures.append(f"{key}: padded columns of {name} got gradient")
            full_s = pad_columns(s_ref.grad, padded)  # zero gradient on padding, as expected
            full_w = pad_columns(w_ref.grad, padded)
            excess[f"{key} loss"] = _max_excess(loss, ref.detach(), FP32_LOSS_ATOL, 0.0)
            excess[f"{key} grad_strong"] = _max_excess(
                gs, _shard(full_s, rank, tp), FP32_GRAD_ATOL, grad_rtol)
            if lam != "single":
                excess[f"{key} grad_weak"] = _max_excess(
                    gw, _shard(full_w, rank, tp), FP32_GRAD_ATOL, grad_rtol)

        stats = mixed_logit_diagnostics(
            _shard(pad_columns(strong, padded, "large"), rank, tp),
            _shard(pad_columns(weak, padded, "nan"), rank, tp), target, 0.42, tp_group=group,
            vocab_size=REAL_VOCAB)
        # The entropy pass's lean one-pass entropy, also over the real columns only.
        lean = token_entropy(_shard(pad_columns(strong, padded, "large"), rank, tp),
                             tp_group=group, vocab_size=REAL_VOCAB)
        valid = target != -100
        excess[f"real-vocab {dtype} token_entropy"] = _max_excess(
            lean[valid], naive_statistics(strong, target)["entropy"][valid], STATS_TOL,
            STATS_TOL)
        mixed = 0.42 * strong.float() + 0.58 * weak.float()
        for name, full in (("strong", strong), ("weak", weak), ("mixed", mixed)):
            for field, want in naive_statistics(full, target).items():
                got = getattr(stats[name], field)
                if not torch.isfinite(got).all():
                    failures.append(f"real-vocab {dtype} stats {name}.{field} not finite")
                excess[f"real-vocab {dtype} stats {name}.{field}"] = _max_excess(
                    got, want, STATS_TOL, STATS_TOL)
    return excess, failures


def _check_everything():
    excess, failures = _check_real_vocab_cases()
    return {**_check_all_cases(), **excess}, failures


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_matches_single_process_reference(tp):
    per_rank = run_distributed(_check_everything, world_size=tp, tp=tp, timeout=300)
    for rank, (excess, failures) in enumerate(per_rank):
        # padded vocab: 2 dtypes x (3 losses + 3 strong grads + 2 weak grads + 12 stats + the
        # lean entropy)
        assert len(excess) == 2 * (4 * 3 + 1 + 12) + 2 * (3 + 3 + 2 + 12 + 1)
        assert not failures, f"tp={tp} rank={rank}: {failures}"
        over = {k: v for k, v in excess.items() if v > 0}
        assert not over, f"tp={tp} rank={rank} out of tolerance by: {over}"


def _unequal_shards():
    from megatron.core import parallel_state

    from megatron_wmss.loss import mixed_cross_entropy

    rank = parallel_state.get_tensor_model_parallel_rank()
    v = 8 if rank == 0 else 9
    logits = torch.zeros(4, v)
    try:
        mixed_cross_entropy(logits, logits, torch.zeros(4, dtype=torch.long), 0.5,
                            tp_group=parallel_state.get_tensor_model_parallel_group())
    except ValueError as exc:
        return str(exc)
    return None


def test_unequal_vocab_shards_raise_on_every_rank():
    messages = run_distributed(_unequal_shards, world_size=2, tp=2, timeout=120)
    for msg in messages:
        assert msg is not None and "vocab shard sizes differ" in msg
        assert "between 8 and 9" in msg


def _target_beyond_global_vocab():
    from megatron.core import parallel_state

    from megatron_wmss.loss import mixed_cross_entropy

    logits = torch.zeros(2, 8)  # V = 16 over two ranks: id 15 is valid, 16 is not
    group = parallel_state.get_tensor_model_parallel_group()
    ok = mixed_cross_entropy(logits, logits, torch.tensor([15, 0]), 0.5, tp_group=group)
    mixed_cross_entropy(logits, logits, torch.tensor([16, 0]), 0.5, tp_group=group)
    return ok


def test_target_range_is_checked_against_the_global_vocab():
    with pytest.raises(DistributedRunError, match=r"token id 16 outside \[0, 16\)"):
        run_distributed(_target_beyond_global_vocab, world_size=2, tp=2, timeout=120)
