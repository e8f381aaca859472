"""The mixed cross-entropy straight from hidden states, in token chunks: no ``[T, V]`` tensor.

Because the output layers are linear (WMSS.md §3),

    z_mix = λ·h_s·W_sᵀ + (1−λ)·h_w·W_wᵀ = [λ·h_s ‖ (1−λ)·h_w] · [W_s ‖ W_w]ᵀ,

so the mixed loss is one linear cross-entropy. This module computes it chunk by chunk over the
tokens: a chunk's logits ``[c, v]`` live only while that chunk is processed.

Forward, per chunk: both models' logits in their own dtype (as their output layers would
make them), upcast and mixed in fp32, padded columns masked to −inf, then this shard's
log-sum-exp and target logit. After all chunks, the shards' log-sum-exps are combined with
one all-reduce MAX of ``[t + 2]`` (row max plus the shard-size guard) and one all-reduce SUM
of ``[2, t]``: the same collectives as :func:`~megatron_wmss.loss.mixed_cross_entropy`.
Saved: the inputs (no copies) and ``[t]`` vectors.

Backward, per chunk: the logits again (one more matmul per model than the unfused path, the
price of never storing them), ``g = (softmax(z_mix) − onehot(y))·dloss``, then
``dh_s = λ·g·W_s``, ``dW_s += λ·gᵀ·h_s`` and the same with ``1−λ`` for the weak model. ``g`` is
cast to each model's dtype first, as the unfused path hands its output layer a gradient of the
logits' dtype. Weight gradients accumulate in fp32 over the chunks. Hidden gradients are
partial sums over this vocab shard: one all-reduce SUM of ``[t, h_s + h_w]`` over
``tp_group`` completes them (what megatron's ``ColumnParallelLinear`` does for its input), so
the hidden states passed in are the replicated (not sequence-parallel) decoder outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_wmss.loss.mixed_cross_entropy import _scaled
from megatron_wmss.loss.vocab_parallel import (
    all_reduce_max_checked,
    all_reduce_sum,
    check_mix_lambda,
    check_target_range,
    check_vocab_size,
    real_columns_in_shard,
    shard_rank_and_size,
    target_in_shard,
)

__all__ = ["default_chunk_size", "linear_cross_entropy", "linear_mixed_cross_entropy"]

_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk and model: 64 MiB


def default_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk: about 16M logits (64 MiB in fp32) of this shard at a time."""
    return max(16, _CHUNK_ELEMENTS // max(local_vocab, 1))


def _chunk_logits(hidden, weight, lam, rows, real, local_vocab, dtype):
    """``Σ λ_i·h_i[rows]·W_iᵀ`` in ``dtype`` (fp32; fp64 for fp64 inputs) of the models that
    take part, padded columns −inf."""
    mixed = None
    for h, w, scale in zip(hidden, weight, lam):
        if scale == 0.0:
            continue  # a model at weight 0 is never read (its logits may be inf or nan)
        z = torch.matmul(h[rows], w.t()).to(dtype)
        if scale != 1.0:
            z.mul_(scale)
        mixed = z if mixed is None else mixed.add_(z)
    if real < local_vocab:
        mixed[:, real:] = -torch.inf
    return mixed


class _LinearMixedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strong_hidden, weak_hidden, strong_weight, weak_weight, target, mix_lambda,
                tp_group, ignore_index, vocab_size, chunk_size):
        lam = (mix_lambda, 1.0 - mix_lambda)
        hidden = [x.reshape(-1, x.shape[-1]) if x is not None else None
                  for x in (strong_hidden, weak_hidden)]
        weight = [strong_weight, weak_weight]
        used = [w for w, s in zip(weight, lam) if s != 0.0]
        local_vocab = used[0].shape[0]
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in used) else torch.float32
        target_t = target.reshape(-1).long()
        valid_t = target_t != ignore_index
        rank, _ = shard_rank_and_size(tp_group)
        real = real_columns_in_shard(vocab_size, rank * local_vocab, local_vocab)
        local_target_t, in_shard_t = target_in_shard(target_t, valid_t, rank * local_vocab,
                                                     local_vocab)
        tokens = target_t.numel()
        device = target_t.device
        lse_t = torch.empty(tokens, dtype=dtype, device=device)
        target_logit_t = torch.zeros(tokens, dtype=dtype, device=device)
        chunk = chunk_size or default_chunk_size(local_vocab)
        for start in range(0, tokens, chunk):
            rows = slice(start, min(start + chunk, tokens))
            z = _chunk_logits(hidden, weight, lam, rows, real, local_vocab, dtype)
            lse_t[rows] = torch.logsumexp(z, dim=-1)  # −inf on a shard of padding only
            picked = z.gather(-1, local_target_t[rows].unsqueeze(-1)).squeeze(-1)
            target_logit_t[rows] = torch.where(in_shard_t[rows], picked, 0.0)
            del z
        # Combine the shards: lse = M + log Σ_r exp(lse_r − M), M = max_r lse_r.
        max_t, vocab = all_reduce_max_checked(lse_t, local_vocab, tp_group)
        check_target_range(target_t, valid_t, vocab, ignore_index, vocab_size)
        sums_2t = torch.stack([target_logit_t, torch.exp(lse_t - max_t)])
        all_reduce_sum(sums_2t, tp_group)
        lse_t = max_t + torch.log(sums_2t[1])
        loss_t = torch.where(valid_t, lse_t - sums_2t[0], 0.0)

        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in
                                (hidden[0], hidden[1], strong_weight, weak_weight)),
                              lse_t, local_target_t, in_shard_t, valid_t)
        ctx.present = (strong_hidden is not None, weak_hidden is not None)
        ctx.hidden_shapes = (None if strong_hidden is None else strong_hidden.shape,
                             None if weak_hidden is None else weak_hidden.shape)
        ctx.setup = (lam, tp_group, real, local_vocab, chunk)
        return loss_t.view(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        hidden = [saved[0] if ctx.present[0] else None, saved[1] if ctx.present[1] else None]
        weight = [saved[2] if ctx.present[0] else None, saved[3] if ctx.present[1] else None]
        lse_t, local_target_t, in_shard_t, valid_t = saved[4:]
        lam, tp_group, real, local_vocab, chunk = ctx.setup
        want_hidden = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        want_weight = [ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_loss_t = torch.where(valid_t, grad_loss.reshape(-1).to(lse_t.dtype), 0.0)
        tokens = lse_t.numel()

        grad_hidden = [torch.zeros(h.shape, dtype=h.dtype, device=h.device)
                       if want and h is not None else None
                       for h, want in zip(hidden, want_hidden)]
        grad_weight = [torch.zeros(w.shape, dtype=lse_t.dtype, device=w.device)
                       if want and w is not None else None
                       for w, want in zip(weight, want_weight)]
        if any(lam[m] != 0.0 and (grad_hidden[m] is not None or grad_weight[m] is not None)
               for m in range(2)):
            for start in range(0, tokens, chunk):
                rows = slice(start, min(start + chunk, tokens))
                g = _chunk_logits(hidden, weight, lam, rows, real, local_vocab, lse_t.dtype)
                g.sub_(lse_t[rows].unsqueeze(-1)).exp_().mul_(grad_loss_t[rows].unsqueeze(-1))
                onehot = torch.where(in_shard_t[rows], grad_loss_t[rows], 0.0)
                g.scatter_add_(-1, local_target_t[rows].unsqueeze(-1), -onehot.unsqueeze(-1))
                active = [m for m in range(2) if lam[m] != 0.0
                          and (grad_hidden[m] is not None or grad_weight[m] is not None)]
                for m in active:
                    g_m = _scaled(g, lam[m], weight[m].dtype, in_place=m == active[-1])
                    if grad_hidden[m] is not None:
                        grad_hidden[m][rows] = torch.matmul(g_m, weight[m])
                    if grad_weight[m] is not None:
                        grad_weight[m].add_(torch.matmul(g_m.t(), hidden[m][rows]))
                del g
        _, size = shard_rank_and_size(tp_group)
        partial = [x for x in grad_hidden if x is not None]
        if size > 1 and partial:  # the other shards' share of dL/dh (one fused collective)
            flat = torch.cat([x.to(lse_t.dtype) for x in partial], dim=-1)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=tp_group)
            for x, part in zip(partial, flat.split([x.shape[-1] for x in partial], dim=-1)):
                x.copy_(part)
        grads_h = [None if x is None else x.view(shape)
                   for x, shape in zip(grad_hidden, ctx.hidden_shapes)]
        grads_w = [None if gw is None else gw.to(w.dtype) for gw, w in zip(grad_weight, weight)]
        return (grads_h[0], grads_h[1], grads_w[0], grads_w[1],
                None, None, None, None, None, None)


def _check(named: dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
           target: torch.Tensor, chunk_size) -> None:
    leading = None
    for name, (h, w) in named.items():
        if h is None or w is None:
            raise ValueError(f"{name}: hidden states and output weight are both required "
                             "where its mixing weight is > 0")
        if not (torch.is_floating_point(h) and torch.is_floating_point(w)):
            raise ValueError(f"{name}: hidden states and weight must be floating point, got "
                             f"{h.dtype} and {w.dtype}")
        if w.dim() != 2 or h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{name}: hidden [..., h] and weight [v, h] must share h, got "
                             f"{tuple(h.shape)} and {tuple(w.shape)}")
        if leading is not None and (tuple(h.shape[:-1]) != leading[1]
                                    or w.shape[0] != leading[2]):
            raise ValueError(f"{leading[0]} and {name} must cover the same tokens and the same "
                             f"vocab shard, got {leading[1]}/{leading[2]} and "
                             f"{tuple(h.shape[:-1])}/{w.shape[0]}")
        leading = (name, tuple(h.shape[:-1]), w.shape[0])
    if torch.is_floating_point(target) or torch.is_complex(target) or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if tuple(target.shape) != leading[1]:
        raise ValueError(f"target must have the hidden states' shape without the hidden "
                         f"dimension, {leading[1]}, got {tuple(target.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got "
                         f"{chunk_size!r}")


def linear_mixed_cross_entropy(
    strong_hidden: Optional[torch.Tensor],
    weak_hidden: Optional[torch.Tensor],
    strong_weight: Optional[torch.Tensor],
    weak_weight: Optional[torch.Tensor],
    target: torch.Tensor,
    mix_lambda: float,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``λ·h_s·W_sᵀ + (1−λ)·h_w·W_wᵀ``, chunked over tokens.

    Equal to ``mixed_cross_entropy(h_s @ W_s.T, h_w @ W_w.T, ...)`` (same fp32 softmax, same
    real-vocabulary masking, same collectives) without materialising either model's logits.

    Args:
        strong_hidden, weak_hidden: ``[..., h_s]`` and ``[..., h_w]`` final hidden states
            (replicated over ``tp_group``). Either may be frozen.
        strong_weight, weak_weight: ``[v, h_s]`` and ``[v, h_w]`` output-layer weights of this
            rank's vocab shard (a tied embedding's shard works the same). Either may be frozen.
            At λ = 1 the weak pair is not read and may be None; at λ = 0 the strong pair.
        target, mix_lambda, tp_group, ignore_index, vocab_size: as in
            :func:`~megatron_wmss.loss.mixed_cross_entropy`.
        chunk_size: tokens per chunk (default: :func:`default_chunk_size`). Peak extra memory
            is a few ``[chunk_size, v]`` fp32 tensors.

    Returns:
        ``[...]`` fp32 per-token loss, 0 at ignored positions. Gradients reach all four tensors
        (hidden gradients summed over ``tp_group``; weight gradients of this shard).
    """
    lam = check_mix_lambda(mix_lambda)
    named = {}
    if lam != 0.0:
        named["strong"] = (strong_hidden, strong_weight)
    if lam != 1.0:
        named["weak"] = (weak_hidden, weak_weight)
    _check(named, target, chunk_size)
    return _LinearMixedCrossEntropy.apply(strong_hidden, weak_hidden, strong_weight, weak_weight,
                                          target, lam, tp_group, int(ignore_index),
                                          check_vocab_size(vocab_size), chunk_size)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """One model's SFT loss the same chunked way: :func:`linear_mixed_cross_entropy` at λ = 1,
    equal to ``cross_entropy(hidden @ weight.T, ...)``."""
    return linear_mixed_cross_entropy(hidden, None, weight, None, target, 1.0, tp_group,
                                      ignore_index, vocab_size, chunk_size)
