"""The WMSS loss: cross-entropy of the mixed logits of a strong and a weak model, vocab-parallel.

    z_mix = λ·z_strong + (1−λ)·z_weak,    loss = −log softmax(z_mix)[y]
    dloss/dz_strong = λ·g,   dloss/dz_weak = (1−λ)·g,   g = softmax(z_mix) − onehot(y)

Mixing must happen before the softmax: the log-sum-exp of a mix does not factor into the two
models' cross-entropies. Under tensor parallelism every rank holds the same vocab slice of both
models (same tokenizer, same padding), so the mix is shard-local and the reduction is that of
one vocab-parallel cross-entropy.

Real vocabulary: with ``vocab_size`` set, the padded columns (global index >= vocab_size) act as
−inf in the softmax: they take no probability, get exactly zero gradient, and whatever they
hold (zeros, large values, inf, nan) never changes the loss.

``cross_entropy`` is the single-model SFT loss: the same function at λ = 1 with no weak model,
so SFT and joint training take their softmax over the same real columns.

Shape legend: ``[..., v]`` logits of the local vocab shard (``v = V / tp``), ``[...]`` targets
and per-token losses, ``t`` all leading dims flattened.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_wmss.loss.vocab_parallel import (
    all_reduce_max_checked,
    all_reduce_sum,
    check_logits,
    check_mix_lambda,
    check_target_range,
    check_vocab_size,
    mixed_logits_fp32,
    real_columns_in_shard,
    shard_rank_and_size,
    target_in_shard,
)

__all__ = ["cross_entropy", "mixed_cross_entropy"]


class _MixedCrossEntropy(torch.autograd.Function):
    """Vocab-parallel cross-entropy of ``λ·strong + (1−λ)·weak``, computed in fp32.

    Collectives over ``tp_group`` (none when it is ``None`` or of size 1):
      forward:  one all-reduce MAX of ``[t + 2]`` fp32 (row max, plus the shard-size guard),
                one all-reduce SUM of ``[2, t]`` fp32 (target logit and sum of exponentials);
      backward: none.
    Megatron's own vocab-parallel CE issues three all-reduces (MAX, SUM, SUM); the two SUMs are
    fused here.

    Saved for backward: ``exp(z_mix − rowmax)`` in fp32 ``[t, v]`` (the only large tensor;
    backward turns it into the gradient in place, so a second backward through the same graph
    is refused by autograd's version check), plus ``[t]`` sums, indices and masks.

    Unlike ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``, which subtracts the
    row max from its input logits in place, this function never writes to its inputs: the
    strong and weak logits may be reused (e.g. for diagnostics) after the loss.
    """

    @staticmethod
    def forward(ctx, strong_logits, weak_logits, target, mix_lambda, tp_group, ignore_index,
                vocab_size):
        local_vocab = strong_logits.shape[-1]
        strong_tv = strong_logits.reshape(-1, local_vocab)
        weak_tv = None if weak_logits is None else weak_logits.reshape(-1, local_vocab)
        target_t = target.reshape(-1).long()
        valid_t = target_t != ignore_index
        rank, _ = shard_rank_and_size(tp_group)

        mixed_tv = mixed_logits_fp32(strong_tv, weak_tv, mix_lambda)
        # Padded columns become −inf in our own fp32 copy, before any reduction reads them:
        # exp() turns them into exact zeros, so neither loss nor gradient can depend on them.
        real = real_columns_in_shard(vocab_size, rank * local_vocab, local_vocab)
        if real < local_vocab:
            mixed_tv[:, real:] = -torch.inf
        row_max_t = mixed_tv.max(dim=-1).values  # −inf on a shard of padding only
        row_max_t, vocab = all_reduce_max_checked(row_max_t, local_vocab, tp_group)
        check_target_range(target_t, valid_t, vocab, ignore_index, vocab_size)
        mixed_tv.sub_(row_max_t.unsqueeze(-1))

        local_target_t, in_shard_t = target_in_shard(
            target_t, valid_t, rank * local_vocab, local_vocab
        )
        target_logit_t = mixed_tv.gather(-1, local_target_t.unsqueeze(-1)).squeeze(-1)
        target_logit_t = torch.where(in_shard_t, target_logit_t, 0.0)

        exp_tv = mixed_tv.exp_()
        sums_2t = torch.stack([target_logit_t, exp_tv.sum(dim=-1)])
        all_reduce_sum(sums_2t, tp_group)
        target_logit_t, sum_exp_t = sums_2t[0], sums_2t[1]

        loss_t = torch.where(valid_t, torch.log(sum_exp_t) - target_logit_t, 0.0)
        # The softmax is exp / sum_exp; the division waits for backward, where it folds into
        # the scaling by the incoming gradient (one pass over [t, v] instead of two).
        ctx.save_for_backward(exp_tv, sum_exp_t, local_target_t, in_shard_t, valid_t)
        ctx.mix_lambda = mix_lambda
        ctx.logit_shape = strong_logits.shape
        ctx.dtypes = (strong_logits.dtype, None if weak_logits is None else weak_logits.dtype)
        return loss_t.view(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        exp_tv, sum_exp_t, local_target_t, in_shard_t, valid_t = ctx.saved_tensors
        lam = ctx.mix_lambda
        want_strong, want_weak = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        # g = (exp / sum_exp − onehot(y)) · dloss, built in the saved buffer.
        grad_loss_t = torch.where(valid_t, grad_loss.reshape(-1).to(torch.float32), 0.0)
        grad_mixed_tv = exp_tv.mul_((grad_loss_t / sum_exp_t).unsqueeze(-1))
        onehot_t = torch.where(in_shard_t, grad_loss_t, 0.0).unsqueeze(-1)
        grad_mixed_tv.scatter_add_(-1, local_target_t.unsqueeze(-1), -onehot_t)

        grad_strong = grad_weak = None
        if want_strong:
            grad_strong = _scaled(grad_mixed_tv, lam, ctx.dtypes[0], in_place=not want_weak)
            grad_strong = grad_strong.view(ctx.logit_shape)
        if want_weak:
            grad_weak = _scaled(grad_mixed_tv, 1.0 - lam, ctx.dtypes[1], in_place=True)
            grad_weak = grad_weak.view(ctx.logit_shape)
        return grad_strong, grad_weak, None, None, None, None, None


def _scaled(grad_tv: torch.Tensor, scale: float, dtype: torch.dtype, in_place: bool):
    """``scale · grad`` in ``dtype``; reuses the fp32 buffer when allowed and no cast is due."""
    if dtype == torch.float32 and in_place:
        return grad_tv.mul_(scale)
    # torch.mul writes straight into a tensor of the input's dtype: no extra fp32 temporary.
    return torch.mul(grad_tv, scale, out=torch.empty(grad_tv.shape, dtype=dtype,
                                                      device=grad_tv.device))


def mixed_cross_entropy(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    mix_lambda: float,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``mix_lambda·strong_logits + (1−mix_lambda)·weak_logits``.

    Args:
        strong_logits, weak_logits: ``[..., v]`` logits of this rank's vocab shard (fp32, bf16
            or fp16; either may have ``requires_grad=False``). Never modified.
        target: ``[...]`` integer global token ids in ``[0, vocab_size)`` (``[0, V)``,
            ``V = v · tp``, when ``vocab_size`` is None), or ``ignore_index`` where no loss
            is taken.
        mix_lambda: weight of the strong model, in [0, 1] (paper default 0.5).
        tp_group: tensor-parallel group the vocab is split over; ``None`` means the whole
            vocabulary is local.
        ignore_index: target value of unsupervised positions (their loss and gradient are 0).
        vocab_size: global number of real vocabulary columns (the tokenizer's size); columns
            at or past it are padding and excluded from the softmax. None: all are real.

    Returns:
        ``[...]`` fp32 per-token loss (nats), 0 at ignored positions. Gradients flow back as
        ``mix_lambda·g`` and ``(1−mix_lambda)·g`` in each input's own dtype (exactly 0 on
        padded columns).
    """
    check_logits({"strong_logits": strong_logits, "weak_logits": weak_logits}, target)
    lam = check_mix_lambda(mix_lambda)
    return _MixedCrossEntropy.apply(strong_logits, weak_logits, target, lam, tp_group,
                                    int(ignore_index), check_vocab_size(vocab_size))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token vocab-parallel cross-entropy of one model's ``[..., v]`` logits shard (SFT).

    :func:`mixed_cross_entropy` at λ = 1 without a weak model: same arguments, same
    collectives, same fp32 numerics and real-vocabulary masking. Never modifies ``logits``.
    """
    check_logits({"logits": logits}, target)
    return _MixedCrossEntropy.apply(logits, None, target, 1.0, tp_group, int(ignore_index),
                                    check_vocab_size(vocab_size))
