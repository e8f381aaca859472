"""Saturation diagnostics of the strong, weak and mixed distributions, vocab-parallel.

Per token (WMSS §8): entropy ``H = −Σ_k p_k log p_k`` (nats), target probability ``p_y``, logit
margin ``z_y − mean_{k≠y} z_k``, and logit standard deviation over the vocabulary. Under SFT the
strong model's margin grows and its non-target mass ``1 − p_y`` collapses; WMSS works by keeping
the mixed distribution's non-target mass alive. All statistics are taken over the real
vocabulary (the first ``vocab_size`` global columns; all columns when it is None), from
shard-local sums, without ever gathering the vocabulary: padded columns are sliced away, so
margin and standard deviation stay finite whatever they hold.

Shape legend: ``[..., v]`` local vocab shard, ``t`` flattened tokens, ``k`` distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

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

__all__ = ["TokenStatistics", "mixed_logit_diagnostics", "token_entropy", "token_statistics"]


@dataclass
class TokenStatistics:
    """Per-token statistics of one distribution, each ``[...]`` fp32 (0 at ignored positions)."""

    entropy: torch.Tensor
    target_prob: torch.Tensor
    margin: torch.Tensor
    logit_std: torch.Tensor
    valid: torch.Tensor  # bool, False at ignored positions

    def means(self) -> dict[str, float]:
        """Means over supervised tokens of this rank (nan when there are none)."""
        count = self.valid.sum()
        return {
            name: float(getattr(self, name).sum() / count)
            for name in ("entropy", "target_prob", "margin", "logit_std")
        }


@torch.no_grad()
def token_statistics(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
) -> list[TokenStatistics]:
    """Statistics of each ``[..., v]`` logits tensor in ``logits`` against ``target``, over
    the first ``vocab_size`` global columns (None: all).

    Collectives over ``tp_group``, shared by all distributions: one all-reduce MAX of
    ``[k·t + 2]`` and one all-reduce SUM of ``[k, 5, t]``, both fp32.
    """
    if len(logits) == 0:
        raise ValueError("logits must hold at least one tensor")
    check_logits({f"logits[{i}]": x for i, x in enumerate(logits)}, target)
    vocab_size = check_vocab_size(vocab_size)
    local_vocab = logits[0].shape[-1]
    target_t = target.reshape(-1).long()
    valid_t = target_t != ignore_index
    rank, _ = shard_rank_and_size(tp_group)

    # Real columns come first in every shard; a view drops the padded ones.
    real = real_columns_in_shard(vocab_size, rank * local_vocab, local_vocab)
    flat = [x.reshape(-1, local_vocab)[:, :real] for x in logits]
    # The max of bf16 values is exact, so it can be taken before any fp32 copy exists.
    row_max_kt = torch.stack([_row_max(x_tv) for x_tv in flat])
    row_max_kt, padded_vocab = all_reduce_max_checked(row_max_kt, local_vocab, tp_group)
    check_target_range(target_t, valid_t, padded_vocab, ignore_index, vocab_size)
    vocab = padded_vocab if vocab_size is None else vocab_size

    local_target_t, in_shard_t = target_in_shard(
        target_t, valid_t, rank * local_vocab, local_vocab
    )
    sums = []
    for x_tv, row_max_t in zip(flat, row_max_kt):
        # z' = z − rowmax keeps exp() in range; every statistic below is shift-invariant. One
        # fp32 [t, v] tensor per distribution, made here and freed before the next.
        z_tv = torch.sub(x_tv, row_max_t.unsqueeze(-1))
        if real:
            z_target_t = z_tv.gather(-1, local_target_t.unsqueeze(-1)).squeeze(-1)
        else:  # a shard of padding only holds no target
            z_target_t = torch.zeros_like(row_max_t)
        z_sum_t, z_sq_sum_t = z_tv.sum(dim=-1), z_tv.square().sum(dim=-1)
        e_tv = z_tv.exp()
        sums.append(torch.stack([
            e_tv.sum(dim=-1),                       # S = Σ e^z'
            # e^z' z' → 0 as z' → −inf; masked (−inf) columns would give 0·inf = nan.
            torch.where(e_tv > 0, e_tv * z_tv, 0.0).sum(dim=-1),  # Σ e^z' z'
            torch.where(in_shard_t, z_target_t, 0.0),
            z_sum_t,
            z_sq_sum_t,
        ]))
    sums_k5t = all_reduce_sum(torch.stack(sums), tp_group)

    out = []
    for sum_exp_t, sum_ez_t, z_target_t, z_sum_t, z_sq_sum_t in sums_k5t.unbind(0):
        entropy_t = torch.log(sum_exp_t) - sum_ez_t / sum_exp_t
        target_prob_t = torch.exp(z_target_t) / sum_exp_t
        margin_t = z_target_t - (z_sum_t - z_target_t) / max(vocab - 1, 1)
        mean_t = z_sum_t / vocab
        std_t = (z_sq_sum_t / vocab - mean_t.square()).clamp_min(0.0).sqrt()
        out.append(TokenStatistics(
            entropy=_masked(entropy_t, valid_t, target.shape),
            target_prob=_masked(target_prob_t, valid_t, target.shape),
            margin=_masked(margin_t, valid_t, target.shape),
            logit_std=_masked(std_t, valid_t, target.shape),
            valid=valid_t.view(target.shape),
        ))
    return out


def _row_max(x_tv: torch.Tensor) -> torch.Tensor:
    """fp32 row max; −inf for a shard with no real column (it then adds nothing to the sums)."""
    if x_tv.shape[-1] == 0:
        return torch.full(x_tv.shape[:1], -torch.inf, dtype=torch.float32, device=x_tv.device)
    return x_tv.max(dim=-1).values.float()


def _masked(values_t: torch.Tensor, valid_t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.where(valid_t, values_t, 0.0).view(shape)


@torch.no_grad()
def mixed_logit_diagnostics(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    mix_lambda: float,
    tp_group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
) -> dict[str, TokenStatistics]:
    """Statistics of the ``"strong"``, ``"weak"`` and ``"mixed"`` distributions (same arguments
    as :func:`~megatron_wmss.loss.mixed_cross_entropy`). Inputs are not modified."""
    check_logits({"strong_logits": strong_logits, "weak_logits": weak_logits}, target)
    lam = check_mix_lambda(mix_lambda)
    mixed = mixed_logits_fp32(strong_logits, weak_logits, lam)
    stats = token_statistics([strong_logits, weak_logits, mixed], target, tp_group, ignore_index,
                             vocab_size)
    return dict(zip(("strong", "weak", "mixed"), stats))


@torch.no_grad()
def token_entropy(
    logits: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[...]`` fp32 entropy (nats) of ``softmax(logits)`` over the first ``vocab_size`` global
    columns, from this rank's ``[..., v]`` shard; the lean path of the curriculum's entropy pass.
    With ``mask`` (``[...]`` bool, the same on every tensor-parallel rank) only those positions
    are computed (prompt and padding are skipped); the others are 0.

    One pass over the shard, in row chunks of about 2 MB of fp32 (cache-resident: ~3x faster
    on CPU than whole-tensor passes): with the shard's own row max ``m``, ``S = Σ e^{z−m}`` and
    ``T = Σ e^{z−m}(z−m)``; then, with the global max ``M``, ``S' = e^{m−M} S`` and
    ``T' = e^{m−M} (T + (m−M) S)`` are summed over ranks and ``H = log S' − T'/S'``.
    Collectives over ``tp_group``: one all-reduce MAX of ``[t + 2]`` and one SUM of ``[2, t]``.
    """
    if not torch.is_floating_point(logits) or logits.dim() < 1:
        raise ValueError(f"logits must be a floating-point tensor [..., v], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    vocab_size = check_vocab_size(vocab_size)
    local_vocab = logits.shape[-1]
    rank, _ = shard_rank_and_size(tp_group)
    real = real_columns_in_shard(vocab_size, rank * local_vocab, local_vocab)
    x_tv = logits.reshape(-1, local_vocab)[:, :real]
    selected = None
    if mask is not None:
        if tuple(mask.shape) != tuple(logits.shape[:-1]) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(logits.shape[:-1])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        selected = mask.reshape(-1).nonzero().squeeze(1)
    t = x_tv.shape[0] if selected is None else selected.numel()
    local_max_t = torch.full((t,), -torch.inf, dtype=torch.float32, device=x_tv.device)
    sums_2t = torch.zeros(2, t, dtype=torch.float32, device=x_tv.device)
    rows = max(1, (1 << 19) // max(real, 1))
    for start in range(0, t if real else 0, rows):
        end = start + rows
        chunk = x_tv[start:end] if selected is None else x_tv[selected[start:end]]
        z_cv = chunk.to(torch.float32, copy=True)  # the inputs stay untouched
        m_c = z_cv.amax(dim=-1)
        z_cv.sub_(m_c.unsqueeze(-1))
        e_cv = torch.exp(z_cv)
        local_max_t[start:end] = m_c
        sums_2t[0, start:end] = e_cv.sum(dim=-1)
        sums_2t[1, start:end] = e_cv.mul_(z_cv).sum(dim=-1)
    row_max_t, padded_vocab = all_reduce_max_checked(local_max_t, local_vocab, tp_group)
    if vocab_size is not None and vocab_size > padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} exceeds the {padded_vocab} columns the logits "
                         "hold over all tensor-parallel ranks")
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        shift_t = local_max_t - row_max_t  # −inf on a shard of padding only (its S is 0)
        scale_t = torch.exp(shift_t)
        sums_2t[1] = torch.where(sums_2t[0] > 0,
                                 scale_t * (sums_2t[1] + shift_t * sums_2t[0]), 0.0)
        sums_2t[0] *= scale_t
        all_reduce_sum(sums_2t, tp_group)
    entropy_t = torch.log(sums_2t[0]) - sums_2t[1] / sums_2t[0]
    if selected is not None:
        entropy_t = torch.zeros(x_tv.shape[0], dtype=torch.float32,
                                device=x_tv.device).index_copy_(0, selected, entropy_t)
    return entropy_t.view(logits.shape[:-1])
