"""Sequence packing: several samples per row, each attending only to itself.

Shape legend: b = packed rows per micro-batch, s = row length (``max_length`` rounded up to
``pad_to_multiple_of``), n = samples in a row.

Packs are formed once, before training, by best-fit decreasing over the samples' lengths
(deterministic: ties keep the data's order), so a pack's composition never changes and the
sampler shuffles, shards and resumes packs exactly as it does samples (NeMo's packed SFT
works the same way). With packing, ``micro_batch_size`` and the global batch count packed
rows, not samples.

A row holds its samples back to back, then padding. Labels are each sample's own next-token
labels (the last token of a sample predicts nothing, so no loss crosses a boundary); positions
restart at 0 per sample; ``segment_ids`` numbers the samples of a row (-1: padding), from which
the attention mask (local spec) or the cumulative sequence lengths (Transformer Engine's THD
format) are built on the device (:func:`packed_attention_mask`, :func:`packed_seq_params`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["IGNORE_INDEX", "PackedSFTDataset", "collate_packed", "pack_by_length",
           "packed_attention_mask", "packed_seq_params"]

#: Label of positions without a target (PyTorch's cross-entropy ignore_index). Defined here,
#: below ``collate`` (whose loader builds on packing), so that imports run one way.
IGNORE_INDEX = -100


def pack_by_length(lengths: Sequence[int], capacity: int) -> list[np.ndarray]:
    """Group positions ``0..len(lengths)-1`` into packs whose lengths sum to <= ``capacity``.

    Best-fit decreasing: longest first, each into the fullest pack it still fits (O(n log n)).
    Returns the packs, each its positions in increasing order, packs ordered by their first
    position. A sample longer than ``capacity`` is an error (tokenize with a smaller
    ``max_length``)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and int(lengths.max()) > capacity:
        where = int(np.argmax(lengths))
        raise ValueError(f"sample at position {where} has {int(lengths[where])} tokens, more "
                         f"than a packed row holds ({capacity}); tokenize with max_length <= "
                         f"{capacity}")
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (room left, pack number), sorted
    members: list[list[int]] = []
    for position in order.tolist():
        need = int(lengths[position])
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            room, pack = capacity, len(members)
            members.append([])
        else:
            room, pack = free.pop(slot)
        members[pack].append(position)
        if room - need > 0:
            bisect.insort(free, (room - need, pack))
    packs = [np.sort(np.asarray(m, dtype=np.int64)) for m in members]
    packs.sort(key=lambda p: int(p[0]))
    return packs


class PackedSFTDataset:
    """Map-style dataset whose items are packs: lists of samples of an ``SFTDataset``."""

    def __init__(self, samples, packs: Sequence[np.ndarray]) -> None:
        self.samples, self.packs = samples, list(packs)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, pack: int) -> list[dict[str, Any]]:
        return [self.samples[int(row)] for row in self.packs[int(pack)]]


def collate_packed(packs: Sequence[Sequence[Mapping[str, Any]]], *, pad_id: int,
                   length: int) -> dict:
    """Lay ``packs`` (each a list of samples) out as ``[b, length]`` rows.

    Returns what :func:`~megatron_wmss.data.collate.collate_sft` returns (tokens, labels,
    loss_mask, attention_mask = real tokens, position_ids restarting per sample, idx = the
    first sample id of each row) plus ``segment_ids`` [b, s] int64 (sample number within the
    row, -1 on padding) and ``sample_idx`` (every packed sample id, row by row).
    """
    import torch

    b = len(packs)
    tokens = np.full((b, length), pad_id, dtype=np.int64)
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((b, length), dtype=np.int64)
    segments = np.full((b, length), -1, dtype=np.int64)
    sample_idx, first_idx = [], []
    for row, pack in enumerate(packs):
        start = 0
        for number, sample in enumerate(pack):
            ids = np.asarray(sample["input_ids"], dtype=np.int64)
            target = np.asarray(sample["assistant_mask"], dtype=bool)
            n, end = len(ids), start + len(ids)
            if end > length:
                raise ValueError(f"a pack of {sum(len(s['input_ids']) for s in pack)} tokens "
                                 f"does not fit a row of {length}")
            tokens[row, start:end] = ids
            labels[row, start:end - 1] = np.where(target[1:], ids[1:], IGNORE_INDEX)
            positions[row, start:end] = np.arange(n)
            segments[row, start:end] = number
            sample_idx.append(int(sample["idx"]))
            start = end
        first_idx.append(int(pack[0]["idx"]) if pack else -1)
    labels_t = torch.from_numpy(labels)
    segments_t = torch.from_numpy(segments)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": labels_t,
        "loss_mask": (labels_t != IGNORE_INDEX).float(),
        "attention_mask": segments_t >= 0,
        "position_ids": torch.from_numpy(positions),
        "segment_ids": segments_t,
        "idx": torch.tensor(first_idx, dtype=torch.int64),
        "sample_idx": torch.tensor(sample_idx, dtype=torch.int64),
    }


def packed_attention_mask(segment_ids):
    """``[b, 1, s, s]`` bool, True where attention is masked: a later position, or another
    sample of the row (padding forms one segment of its own and carries no loss)."""
    import torch

    s = segment_ids.shape[1]
    later = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu_(1)
    other = segment_ids[:, :, None] != segment_ids[:, None, :]
    return (other | later).unsqueeze(1)


def packed_seq_params(segment_ids, device=None):
    """megatron's ``PackedSeqParams`` (THD) for the rows flattened into one sequence of
    ``b·s`` tokens: a boundary at every change of segment and at every row start, so each
    sample, and each row's padding, is a sequence of its own.

    The boundaries are read on the host (pass the loader's CPU tensor: no device sync);
    ``cu_seqlens`` go to ``device`` (default: where ``segment_ids`` are)."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    seg = segment_ids.cpu()
    b, s = seg.shape
    flat = seg.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    cu = torch.cat([torch.nonzero(starts).reshape(-1), torch.tensor([b * s])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(segment_ids.device if device is None else device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
