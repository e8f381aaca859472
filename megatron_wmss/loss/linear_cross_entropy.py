"""The mixed cross-entropy straight from hidden states, in token chunks: no ``[T, V]`` tensor.

Because the output layers are linear (WMSS.md §3),

    z_mix = λ·h_s·W_sᵀ + (1−λ)·h_w·W_wᵀ = [λ·h_s ‖ (1−λ)·h_w] · [W_s ‖ W_w]ᵀ,

so the mixed loss is one linear cross-entropy. This module computes it in tiles: a chunk of
tokens (``chunk_size``, default 2048) by a block of the vocabulary shard (about 1M logits,
4 MiB fp32, in all): a tile's logits live only while it is processed, and small tiles stay in
cache, so the element-wise passes over them cost little next to the matmuls.

Forward, per tile: both models' logits (in their own dtype, as their output layers would make
them; fp32 ones are multiplied straight into the fp32 tile), mixed in fp32, then the running
maximum and sum of exponentials of this shard's row (the online log-sum-exp) and the target
logit. Padded vocabulary columns are never computed. After all tiles, the shards'
log-sum-exps are combined with one all-reduce MAX of ``[t + 2]`` (row max plus the shard-size
guard) and one all-reduce SUM of ``[2, t]``: the same collectives as
:func:`~megatron_wmss.loss.mixed_cross_entropy`. Saved: the inputs (no copies) and ``[t]``
vectors.

Backward, per tile: the logits again (one more matmul per model than the unfused path, the
price of never storing them), ``g = (softmax(z_mix) − onehot(y))·dloss``, then
``dh_s += λ·g·W_s[block]`` (a chunk's ``[c, h]`` accumulator) and ``dW_s[block] += λ·gᵀ·h_s``,
and the same with ``1−λ`` for the weak model. A bf16 model gets ``λ·g`` cast to bf16 first, as
the unfused path hands its output layer a gradient of the logits' dtype. Accumulation is in
fp32. Hidden gradients are partial sums over this vocab shard: one all-reduce SUM of
``[t, h_s + h_w]`` over ``tp_group`` completes them (what megatron's ``ColumnParallelLinear``
does for its input) when the hidden states passed in are replicated over ``tp_group``.

Sequence parallelism (``sequence_parallel=True``, megatron's layout of the decoder output: each
TP rank holds ``[s/tp, b, h]``, a slice of dim 0): as megatron's output layer does, each
model's hidden states are all-gathered along dim 0 before the loss (megatron's
``gather_from_sequence_parallel_region`` with ``tensor_parallel_output_grad=True``), and their
partial gradients are reduce-scattered back to the slices instead of all-reduced: one
all-gather of ``[s/tp, b, h]`` per model forward, one reduce-scatter of ``[s, b, h]`` per
trained model backward. The targets and the returned loss cover the whole sequence on every
rank; the gathered ``[s, b, h]`` hidden states are saved for backward (megatron's output layer
re-gathers its input instead: ``[s, b, h]·(1 − 1/tp)`` more memory per model, next to the
``[s, b, v/tp]`` fp32 logits the unfused loss would hold).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

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

__all__ = ["default_chunk_size", "gather_sequence_parallel", "linear_cross_entropy",
           "linear_mixed_cross_entropy", "vocab_block_size"]

_TOKENS_PER_CHUNK = 2048
_TILE_ELEMENTS = 1 << 20  # fp32 logits per tile: 4 MiB, about what stays in a core's cache


def default_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk (the tile's rows) when none is given: 2048, whatever the vocabulary
    (a chunk's logits are made a vocabulary block at a time)."""
    del local_vocab  # the vocabulary is tiled: the chunk no longer depends on it
    return _TOKENS_PER_CHUNK


def vocab_block_size(chunk_tokens: int, local_vocab: int) -> int:
    """Vocabulary columns per tile: about 1M logits (4 MiB fp32) per tile, at most the shard."""
    return max(1, min(local_vocab, _TILE_ELEMENTS // max(chunk_tokens, 1)))


def _tile_logits(out, hidden, weight, lam, rows, cols):
    """``out ← Σ λ_i·h_i[rows]·W_i[cols]ᵀ`` (``out`` fp32, or fp64 for fp64 inputs).

    A model whose dtype is ``out``'s is multiplied straight into it (``addmm``: no temporary);
    a bf16/fp16 one makes its logits in its own dtype, as its output layer would, and they are
    upcast before scaling. A model at weight 0 is never read (its inputs may be inf or nan)."""
    first = True
    for h, w, scale in zip(hidden, weight, lam):
        if scale == 0.0:
            continue
        if w.dtype == out.dtype:
            if first:
                torch.mm(h[rows], w[cols].t(), out=out)
                if scale != 1.0:
                    out.mul_(scale)
            else:
                out.addmm_(h[rows], w[cols].t(), alpha=scale)
        else:
            z = torch.mm(h[rows], w[cols].t())
            if first:
                out.copy_(z)
                if scale != 1.0:
                    out.mul_(scale)
            else:
                out.add_(z, alpha=scale)  # promotes z element-wise: no upcast copy
        first = False
    return out


def _target_in_block(local_target, in_shard, start, width):
    """(column of the target inside the block ``[start, start + width)``, clamped into it;
    whether it lies there)."""
    column = local_target - start
    inside = in_shard & (column >= 0) & (column < width)
    return column.clamp_(0, width - 1).unsqueeze(-1), inside


def _tiles(tokens, real, chunk):
    """(token rows, vocab columns) of every tile: token chunks of ``chunk``, each split into
    vocab blocks covering the ``real`` columns (padded columns are never computed)."""
    block = vocab_block_size(chunk, real)
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        yield rows, [slice(c, min(c + block, real)) for c in range(0, real, block)]


class _LinearMixedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strong_hidden, weak_hidden, strong_weight, weak_weight, target, mix_lambda,
                tp_group, ignore_index, vocab_size, chunk_size, reduce_hidden_grad):
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
        chunk = chunk_size or default_chunk_size(local_vocab)
        # This shard's log-sum-exp (−inf on a shard of padding only) and target logit, built
        # over the vocab blocks with a running maximum (the online softmax).
        lse_t = torch.full((tokens,), -torch.inf, dtype=dtype, device=device)
        target_logit_t = torch.zeros(tokens, dtype=dtype, device=device)
        tile = torch.empty(min(chunk, tokens) * vocab_block_size(chunk, real), dtype=dtype,
                           device=device)
        for rows, blocks in _tiles(tokens, real, chunk):
            n = rows.stop - rows.start
            run_max = torch.full((n,), -torch.inf, dtype=dtype, device=device)
            run_sum = torch.zeros(n, dtype=dtype, device=device)
            picked = target_logit_t[rows]
            for cols in blocks:
                z = _tile_logits(tile[: n * (cols.stop - cols.start)].view(n, -1), hidden,
                                 weight, lam, rows, cols)
                column, inside = _target_in_block(local_target_t[rows], in_shard_t[rows],
                                                  cols.start, cols.stop - cols.start)
                picked.add_(torch.where(inside, z.gather(-1, column).squeeze(-1), 0.0))
                new_max = torch.maximum(run_max, z.amax(dim=-1))
                run_sum.mul_(torch.exp(run_max - new_max))  # exp(−inf) = 0 on the first block
                run_sum.add_(z.sub_(new_max.unsqueeze(-1)).exp_().sum(dim=-1))
                run_max = new_max
            if blocks:
                lse_t[rows] = run_max + torch.log(run_sum)
        del tile
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
        ctx.setup = (lam, tp_group, real, local_vocab, chunk, reduce_hidden_grad)
        return loss_t.view(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        hidden = [saved[0] if ctx.present[0] else None, saved[1] if ctx.present[1] else None]
        weight = [saved[2] if ctx.present[0] else None, saved[3] if ctx.present[1] else None]
        lse_t, local_target_t, in_shard_t, valid_t = saved[4:]
        lam, tp_group, real, local_vocab, chunk, reduce_hidden_grad = ctx.setup
        dtype = lse_t.dtype
        want_hidden = [ctx.needs_input_grad[0] and hidden[0] is not None,
                       ctx.needs_input_grad[1] and hidden[1] is not None]
        want_weight = [ctx.needs_input_grad[2] and weight[0] is not None,
                       ctx.needs_input_grad[3] and weight[1] is not None]
        grad_loss_t = torch.where(valid_t, grad_loss.reshape(-1).to(dtype), 0.0)
        tokens = lse_t.numel()

        # Accumulated in fp32 (fp64 for fp64 inputs): each weight gradient over the token
        # chunks, each chunk's hidden gradient over the vocab blocks.
        grad_hidden = [torch.zeros(h.shape, dtype=h.dtype, device=h.device) if want else None
                       for h, want in zip(hidden, want_hidden)]
        grad_weight = [torch.zeros(w.shape, dtype=dtype, device=w.device) if want else None
                       for w, want in zip(weight, want_weight)]
        active = [m for m in range(2) if lam[m] != 0.0 and (want_hidden[m] or want_weight[m])]
        tile = torch.empty(min(chunk, tokens) * vocab_block_size(chunk, real) if active else 0,
                           dtype=dtype, device=lse_t.device)
        for rows, blocks in (_tiles(tokens, real, chunk) if active else ()):
            n = rows.stop - rows.start
            dh = {m: torch.zeros(n, hidden[m].shape[-1], dtype=dtype, device=lse_t.device)
                  for m in active if want_hidden[m]}
            for cols in blocks:
                g = _tile_logits(tile[: n * (cols.stop - cols.start)].view(n, -1), hidden,
                                 weight, lam, rows, cols)
                # g = (softmax(z_mix) − onehot(y))·dloss on this tile.
                g.sub_(lse_t[rows].unsqueeze(-1)).exp_().mul_(grad_loss_t[rows].unsqueeze(-1))
                column, inside = _target_in_block(local_target_t[rows], in_shard_t[rows],
                                                  cols.start, cols.stop - cols.start)
                g.scatter_add_(-1, column,
                               torch.where(inside, -grad_loss_t[rows], 0.0).unsqueeze(-1))
                for m in active:
                    h, w = hidden[m][rows], weight[m][cols]
                    if w.dtype == dtype:  # dh += λ·g·W, dW += λ·gᵀ·h: straight into fp32
                        if m in dh:
                            dh[m].addmm_(g, w, alpha=lam[m])
                        if want_weight[m]:
                            grad_weight[m][cols].addmm_(g.t(), h, alpha=lam[m])
                        continue
                    # The output layer of a bf16 model gets λ·g in bf16, as in the unfused
                    # path; its products are summed in fp32.
                    g_m = torch.mul(g, lam[m], out=torch.empty(g.shape, dtype=w.dtype,
                                                               device=g.device))
                    if m in dh:
                        dh[m].add_(torch.mm(g_m, w))
                    if want_weight[m]:
                        grad_weight[m][cols].add_(torch.mm(g_m.t(), h))
            for m, part in dh.items():
                grad_hidden[m][rows] = part
        del tile
        _, size = shard_rank_and_size(tp_group)
        partial = [x for x in grad_hidden if x is not None]
        # The other shards' share of dL/dh (one fused collective); under sequence parallelism
        # the reduce-scatter of megatron's gather adds it instead.
        if reduce_hidden_grad and size > 1 and partial:
            flat = torch.cat([x.to(dtype) for x in partial], dim=-1)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=tp_group)
            for x, part in zip(partial, flat.split([x.shape[-1] for x in partial], dim=-1)):
                x.copy_(part)
        grads_h = [None if x is None else x.view(shape)
                   for x, shape in zip(grad_hidden, ctx.hidden_shapes)]
        grads_w = [None if gw is None else gw.to(w.dtype) for gw, w in zip(grad_weight, weight)]
        return (grads_h[0], grads_h[1], grads_w[0], grads_w[1],
                None, None, None, None, None, None, None)


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
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy of ``λ·h_s·W_sᵀ + (1−λ)·h_w·W_wᵀ``, chunked over tokens.

    Equal to ``mixed_cross_entropy(h_s @ W_s.T, h_w @ W_w.T, ...)`` (same fp32 softmax, same
    real-vocabulary masking, same collectives) without materialising either model's logits.

    Args:
        strong_hidden, weak_hidden: ``[..., h_s]`` and ``[..., h_w]`` final hidden states,
            replicated over ``tp_group`` (or, with ``sequence_parallel``, this rank's slice of
            dim 0). Either may be frozen.
        strong_weight, weak_weight: ``[v, h_s]`` and ``[v, h_w]`` output-layer weights of this
            rank's vocab shard (a tied embedding's shard works the same). Either may be frozen.
            At λ = 1 the weak pair is not read and may be None; at λ = 0 the strong pair.
        target, mix_lambda, tp_group, ignore_index, vocab_size: as in
            :func:`~megatron_wmss.loss.mixed_cross_entropy`.
        chunk_size: tokens per chunk (default: :func:`default_chunk_size`, 2048). Peak extra
            memory: one tile of about 1M fp32 logits, ``[chunk_size, h]`` fp32 hidden-gradient
            accumulators and fp32 weight gradients.
        sequence_parallel: the hidden states are megatron's sequence-parallel slices
            ``[s/tp, ...]``: gathered over ``tp_group`` (required) along dim 0 before the loss,
            their gradients reduce-scattered back, as megatron's output layer does with
            ``config.sequence_parallel``. ``target`` still covers the whole sequence ``[s, ...]``.

    Returns:
        ``[...]`` fp32 per-token loss over ``target``'s shape, 0 at ignored positions. Gradients
        reach all four tensors (hidden gradients summed over ``tp_group``, of this rank's slice
        under ``sequence_parallel``; weight gradients of this shard).
    """
    lam = check_mix_lambda(mix_lambda)
    if sequence_parallel:
        strong_hidden = gather_sequence_parallel(strong_hidden, tp_group)
        weak_hidden = gather_sequence_parallel(weak_hidden, tp_group)
    named = {}
    if lam != 0.0:
        named["strong"] = (strong_hidden, strong_weight)
    if lam != 1.0:
        named["weak"] = (weak_hidden, weak_weight)
    _check(named, target, chunk_size)
    return _LinearMixedCrossEntropy.apply(strong_hidden, weak_hidden, strong_weight, weak_weight,
                                          target, lam, tp_group, int(ignore_index),
                                          check_vocab_size(vocab_size), chunk_size,
                                          not sequence_parallel)


def gather_sequence_parallel(hidden: Optional[torch.Tensor],
                             tp_group: Optional[dist.ProcessGroup]) -> Optional[torch.Tensor]:
    """``[s/tp, ...]`` sequence-parallel slices → ``[s, ...]`` on every rank of ``tp_group``,
    whose backward reduce-scatters the (vocab-shard partial) gradient back to the slices:
    megatron's ``gather_from_sequence_parallel_region(tensor_parallel_output_grad=True)``, as
    its ``ColumnParallelLinear`` output layer applies to its input. None stays None."""
    if hidden is None:
        return None
    if tp_group is None:
        raise ValueError("sequence_parallel needs tp_group: the tensor-parallel group the "
                         "sequence is split over")
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                group=tp_group)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """One model's SFT loss the same chunked way: :func:`linear_mixed_cross_entropy` at λ = 1,
    equal to ``cross_entropy(hidden @ weight.T, ...)``."""
    return linear_mixed_cross_entropy(hidden, None, weight, None, target, 1.0, tp_group,
                                      ignore_index, vocab_size, chunk_size, sequence_parallel)
