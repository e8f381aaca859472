"""Label smoothing as a term added to a (vocab-parallel) cross-entropy.

With ``q = (1−ε)·onehot(y) + ε/V`` over the V real tokens,

    CE_ε(z, y) = −Σ_v q_v log p_v = CE(z, y) + ε·(z_y − mean_v z_v)

since ``−log p_v = lse(z) − z_v`` and ``lse(z) = CE(z, y) + z_y``. The added term is linear in
the logits, so it needs no softmax: :func:`smoothing_term` computes ``z_y − mean_v z_v`` from
this rank's logit shard, :func:`smoothing_term_from_hidden` from the final hidden states and
the output-weight shard (``z = h·Wᵀ``: ``z_y = h·W_y``, ``mean_v z_v = h·mean_v W_v``), both
in fp32, summed over ``tp_group`` with megatron's autograd-aware all-reduce (forward SUM,
backward identity; the hidden states enter through the copy whose backward is the SUM of
their gradients, as a column-parallel layer does; sequence-parallel slices through megatron's
sequence gather, whose backward reduce-scatters them). Used by the SFT control "label
smoothing" of ``wmss run --ablations``; gradient ``ε·(onehot − 1/V)`` added to CE's.

Shapes: ``logits_tv`` ``[..., V/tp]``, ``hidden_th`` ``[..., h]``, ``weight_vh`` ``[V/tp, h]``,
``target`` ``[...]`` global ids; ignored positions give 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_wmss.loss.linear_cross_entropy import gather_sequence_parallel
from megatron_wmss.loss.vocab_parallel import real_columns_in_shard

__all__ = ["smoothing_term", "smoothing_term_from_hidden"]


def _shard(local_vocab: int, tp_group) -> tuple[int, int]:
    rank = dist.get_rank(group=tp_group) if tp_group is not None else 0
    return rank * local_vocab, (dist.get_world_size(group=tp_group) if tp_group is not None
                                else 1)


def _sum_over(tp_group, tensor: torch.Tensor) -> torch.Tensor:
    if tp_group is None or dist.get_world_size(group=tp_group) == 1:
        return tensor
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(tensor, group=tp_group)


def _local_target(target, start: int, local_vocab: int, ignore_index: int):
    valid = target != ignore_index
    local = (target >= start) & (target < start + local_vocab) & valid
    return valid, local, torch.where(local, target - start, torch.zeros_like(target))


def smoothing_term(logits_tv: torch.Tensor, target: torch.Tensor, *, tp_group=None,
                   vocab_size: Optional[int] = None, ignore_index: int = -100) -> torch.Tensor:
    """``z_y − mean_v z_v`` per position (fp32, 0 where ignored), from vocab-parallel logits."""
    local_vocab = logits_tv.shape[-1]
    start, world = _shard(local_vocab, tp_group)
    real = real_columns_in_shard(vocab_size, start, local_vocab)
    total_vocab = vocab_size if vocab_size is not None else local_vocab * world
    z = logits_tv.float()
    valid, local, index = _local_target(target, start, local_vocab, ignore_index)
    z_y = z.gather(-1, index.unsqueeze(-1)).squeeze(-1) * local
    both = torch.stack([z_y, z[..., :real].sum(-1)], dim=-1)
    both = _sum_over(tp_group, both)
    return (both[..., 0] - both[..., 1] / total_vocab) * valid


def smoothing_term_from_hidden(hidden_th: torch.Tensor, weight_vh: torch.Tensor,
                               target: torch.Tensor, *, tp_group=None,
                               vocab_size: Optional[int] = None, ignore_index: int = -100,
                               sequence_parallel: bool = False) -> torch.Tensor:
    """``z_y − mean_v z_v`` per position with ``z = h·Wᵀ``, never forming the logits.

    ``sequence_parallel``: ``hidden_th`` is this rank's ``[s/tp, ...]`` slice, gathered along
    dim 0 (gradient reduce-scattered back), as in
    :func:`~megatron_wmss.loss.linear_cross_entropy.linear_mixed_cross_entropy`."""
    local_vocab = weight_vh.shape[0]
    start, world = _shard(local_vocab, tp_group)
    real = real_columns_in_shard(vocab_size, start, local_vocab)
    total_vocab = vocab_size if vocab_size is not None else local_vocab * world
    h = hidden_th.float()
    if sequence_parallel:
        h = gather_sequence_parallel(h, tp_group)
    elif world > 1:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h, group=tp_group)
    w = weight_vh.float()
    valid, local, index = _local_target(target, start, local_vocab, ignore_index)
    z_y = (h * w[index]).sum(-1) * local
    z_mean = h @ w[:real].sum(0)
    both = _sum_over(tp_group, torch.stack([z_y, z_mean], dim=-1))
    return (both[..., 0] - both[..., 1] / total_vocab) * valid
