"""Small steps shared by the vocab-parallel mixed cross-entropy and its diagnostics.

Shape legend: ``t`` tokens (all leading dims flattened), ``v`` the local vocab shard
(``V / tp``), ``V`` the global (padded) vocabulary. Every tensor-parallel rank holds the same
tokens and the same slice ``[rank * v, (rank + 1) * v)`` of both models' vocabularies.

Host synchronisation: on an accelerator (:func:`host_sync_costs`) the input checks never read a
device value on the host: the target range is asserted asynchronously (the error surfaces at a
later synchronisation; the training step checks its labels on the host side of the data before
they reach the device), and the shard sizes are checked once per process group and shard size.
On the CPU, where reading a value costs nothing, both checks run in full on every call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_max_checked",
    "all_reduce_sum",
    "check_mix_lambda",
    "check_logits",
    "check_target_range",
    "check_vocab_size",
    "host_sync_costs",
    "mixed_logits_fp32",
    "real_columns_in_shard",
    "shard_rank_and_size",
    "target_in_shard",
]


def host_sync_costs(tensor: torch.Tensor) -> bool:
    """Whether reading one of ``tensor``'s values on the host stalls a device queue (CUDA and
    other accelerators, not the CPU): then the checks here stay asynchronous."""
    return tensor.device.type != "cpu"


# (process group, its ranks, local vocab) whose equal shard sizes a collective has confirmed.
_CHECKED_SHARDS: set[tuple[int, tuple[int, ...], int]] = set()


def check_mix_lambda(mix_lambda) -> float:
    """``mix_lambda`` as a float in [0, 1] (the strong model's weight), else ValueError.
    Pass a Python float: a device tensor is read on the host (a synchronisation)."""
    if isinstance(mix_lambda, torch.Tensor):
        if mix_lambda.numel() != 1:
            raise ValueError(f"mix_lambda must be a scalar, got a tensor of shape "
                             f"{tuple(mix_lambda.shape)}")
        mix_lambda = mix_lambda.item()
    if isinstance(mix_lambda, bool) or not isinstance(mix_lambda, (int, float)):
        raise ValueError(f"mix_lambda must be a number in [0, 1], got {mix_lambda!r}")
    value = float(mix_lambda)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"mix_lambda must be in [0, 1] (weight of the strong model), got {value}")
    return value


def check_logits(
    named_logits: dict[str, torch.Tensor], target: torch.Tensor
) -> None:
    """Logits are floating, share one shape, and ``target`` is integer with their leading shape."""
    shapes = {name: tuple(x.shape) for name, x in named_logits.items()}
    first_name, first = next(iter(named_logits.items()))
    for name, logits in named_logits.items():
        if not torch.is_floating_point(logits):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"{name} must have a non-empty vocab dimension, got shape "
                             f"{tuple(logits.shape)}")
        if logits.shape != first.shape:
            raise ValueError(f"{first_name} and {name} must have the same shape (same tokens, same "
                             f"vocab shard), got {shapes}")
    if torch.is_floating_point(target) or torch.is_complex(target) or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids (int64/int32/...), got dtype "
                         f"{target.dtype}")
    if tuple(target.shape) != tuple(first.shape[:-1]):
        raise ValueError(f"target must have the logits' shape without the vocab dimension, "
                         f"{tuple(first.shape[:-1])}, got {tuple(target.shape)}")


def shard_rank_and_size(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) of this process in the tensor-parallel group; (0, 1) when ``None``."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def all_reduce_sum(tensor: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """In-place SUM over the tensor-parallel group (nothing when the vocab is local)."""
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=tp_group)
    return tensor


def all_reduce_max_checked(
    row_max: torch.Tensor, local_vocab: int, tp_group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, int]:
    """MAX-reduce ``row_max`` (any shape) over the group; return it and the global vocab size.

    The local shard size rides along in the same collective as ``[v, -v]``: after a MAX they
    read ``[max v, -min v]``, so unequal shards are caught without a collective of their own.
    On an accelerator that read is a host sync, so it happens only on the first call for a
    given group and shard size; later calls reduce ``row_max`` alone.
    """
    _, size = shard_rank_and_size(tp_group)
    if size == 1:
        return row_max, local_vocab
    key = (id(tp_group), tuple(dist.get_process_group_ranks(tp_group)), local_vocab)
    if host_sync_costs(row_max) and key in _CHECKED_SHARDS:
        reduced = row_max.clone()  # callers keep their local maxima
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=tp_group)
        return reduced, local_vocab * size
    flat = row_max.reshape(-1)
    guard = torch.tensor([local_vocab, -local_vocab], dtype=flat.dtype, device=flat.device)
    packed = torch.cat([flat, guard])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
    largest, smallest = int(packed[-2].item()), -int(packed[-1].item())
    if largest != smallest:
        raise ValueError(
            f"vocab shard sizes differ across tensor-parallel ranks (between {smallest} and "
            f"{largest}; this rank has {local_vocab}): strong and weak logits must be split into "
            "equal shards of one padded vocabulary on every rank"
        )
    _CHECKED_SHARDS.add(key)
    return packed[:-2].view_as(row_max), local_vocab * size


def check_vocab_size(vocab_size) -> Optional[int]:
    """``vocab_size`` (the global number of real columns) as an int >= 1, or None."""
    if vocab_size is None:
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int (the number of real vocabulary "
                         f"columns) or None, got {vocab_size!r}")
    return vocab_size


def real_columns_in_shard(vocab_size: Optional[int], vocab_start: int, local_vocab: int) -> int:
    """How many of this shard's ``local_vocab`` columns (global ``vocab_start`` on) are real;
    they come first. ``vocab_size=None``: all of them."""
    if vocab_size is None:
        return local_vocab
    return min(max(vocab_size - vocab_start, 0), local_vocab)


def check_target_range(
    target_t: torch.Tensor, valid_t: torch.Tensor, padded_vocab: int, ignore_index: int,
    vocab_size: Optional[int] = None,
) -> None:
    """``vocab_size`` fits the padded vocabulary and every supervised target id lies in
    ``[0, vocab_size)`` (default: the padded size). On the CPU a ValueError names the first bad
    id; on an accelerator the check is an asynchronous device assert (no host sync)."""
    if vocab_size is not None and vocab_size > padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} exceeds the {padded_vocab} columns the "
                         "logits hold over all tensor-parallel ranks")
    vocab = padded_vocab if vocab_size is None else vocab_size
    bad_t = valid_t & ((target_t < 0) | (target_t >= vocab))
    if host_sync_costs(target_t):
        torch._assert_async(~bad_t.any(), f"target holds a token id outside [0, {vocab}); use "
                                          f"ignore_index={ignore_index} for positions without "
                                          "loss")
        return
    if bool(bad_t.any()):
        example = int(target_t[bad_t][0].item())
        what = "the padded vocabulary" if vocab_size is None else "the real vocabulary"
        raise ValueError(
            f"target holds token id {example} outside [0, {vocab}) ({what}); "
            f"use ignore_index={ignore_index} for positions without loss"
        )


def mixed_logits_fp32(
    strong_tv: torch.Tensor, weak_tv: Optional[torch.Tensor], mix_lambda: float
) -> torch.Tensor:
    """A new fp32 tensor ``λ·strong + (1−λ)·weak``; never aliases or modifies the inputs.

    At λ = 1 (or 0) the other model is not read at all, so the result equals the strong (weak)
    logits exactly even if the unused ones hold inf or nan; ``weak_tv`` may be None at λ = 1.
    """
    if mix_lambda == 1.0:
        return strong_tv.to(torch.float32, copy=True)
    if mix_lambda == 0.0:
        return weak_tv.to(torch.float32, copy=True)
    if strong_tv.dtype == torch.float32:
        mixed_tv = strong_tv * mix_lambda  # one pass, and a new tensor
    else:
        # Upcast before scaling: ``bf16 * float`` would round λ·z to bf16 first.
        mixed_tv = strong_tv.to(torch.float32).mul_(mix_lambda)
    # add_ promotes a bf16 ``weak`` to fp32 element-wise: no fp32 copy of it is made.
    return mixed_tv.add_(weak_tv, alpha=1.0 - mix_lambda)


def target_in_shard(
    target_t: torch.Tensor, valid_t: torch.Tensor, vocab_start: int, local_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of the target, or 0; whether this rank's shard holds a supervised target)."""
    local_t = target_t - vocab_start
    in_shard_t = valid_t & (local_t >= 0) & (local_t < local_vocab)
    return torch.where(in_shard_t, local_t, torch.zeros_like(local_t)), in_shard_t
