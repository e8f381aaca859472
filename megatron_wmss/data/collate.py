"""Micro-batch assembly: right padding, next-token labels, masks, and the loader that uses them.

Shape legend: b = micro-batch size, s = padded sequence length (longest sample rounded up to
``pad_to_multiple_of``, or a fixed length), L = one sample's length.

Each sample is its token ids [L] and assistant mask [L] (True: a completion token). The logit at
position t predicts token t+1, so ``labels[t] = tokens[t+1]`` where token t+1 is a completion
token and -100 elsewhere (the last real position and padding included).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_wmss.data.config import DataConfig
from megatron_wmss.data.packing import IGNORE_INDEX
from megatron_wmss.data.sampler import DistributedEpochSampler, read_active_set
from megatron_wmss.data.tokenization import Status, TokenizedSFT

if TYPE_CHECKING:
    import torch

__all__ = ["SFTDataset", "build_sft_loader", "collate_sft", "epoch_items", "loader_rows",
           "packs_for"]


class SFTDataset:
    """Map-style dataset over the kept rows of a :class:`TokenizedSFT` (torch DataLoader ready)."""

    def __init__(self, data: TokenizedSFT) -> None:
        self._table = data.dataset.with_format("numpy", columns=["idx", "input_ids",
                                                                 "assistant_mask"])

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, row: int) -> dict[str, Any]:
        """``{"input_ids": [L] int32, "assistant_mask": [L] bool, "idx": int}`` of one row."""
        return self._table[int(row)]


def collate_sft(samples: Sequence[Mapping[str, Any]], *, pad_id: int,
                pad_to_multiple_of: int = 8, pad_to_length: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Pad ``samples`` into one micro-batch.

    Returns tokens [b, s] int64, labels [b, s] int64 (-100: no target), loss_mask [b, s] float32
    (1.0 where labels is a target), attention_mask [b, s] bool (True: a real token; padding is
    on the right, so a causal mask alone already keeps it out of every real position),
    position_ids [b, s] int64, idx [b] int64 (sample ids).
    """
    import torch

    lengths = [len(s["input_ids"]) for s in samples]
    longest = max(lengths)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if pad_to_length is not None:
        if longest > pad_to_length:
            raise ValueError(f"a sample of {longest} tokens does not fit pad_to_length = "
                             f"{pad_to_length}; tokenize with max_length <= {pad_to_length}")
        length = pad_to_length
    b = len(samples)
    tokens = np.full((b, length), pad_id, dtype=np.int64)
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    real = np.zeros((b, length), dtype=bool)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        target = np.asarray(sample["assistant_mask"], dtype=bool)
        tokens[row, :n] = ids
        labels[row, : n - 1] = np.where(target[1:], ids[1:], IGNORE_INDEX)
        real[row, :n] = True
    labels_t = torch.from_numpy(labels)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": labels_t,
        "loss_mask": (labels_t != IGNORE_INDEX).float(),
        "attention_mask": torch.from_numpy(real),
        "position_ids": torch.arange(length, dtype=torch.int64).expand(b, length).contiguous(),
        "idx": torch.tensor([int(s["idx"]) for s in samples], dtype=torch.int64),
    }


def loader_rows(data: TokenizedSFT, config: DataConfig) -> int | np.ndarray:
    """What the sampler visits once per epoch: the kept rows (their count) or, with
    ``config.active_set``, the rows it lists, each as often as listed."""
    if config.active_set is None:
        return len(data)
    return data.rows_for_idx(read_active_set(config.active_set), config.active_set)


def packs_for(data: TokenizedSFT, config: DataConfig) -> list[np.ndarray]:
    """With ``config.pack_sequences``: the packs (dataset rows per packed row) of
    :func:`loader_rows`, each at most ``config.row_length`` tokens."""
    from megatron_wmss.data.packing import pack_by_length

    rows = loader_rows(data, config)
    rows = np.arange(rows, dtype=np.int64) if isinstance(rows, int) else rows
    # The backing table also holds the rows tokenization did not keep (the dataset selects the
    # kept ones through an index map): keep the lengths of kept rows, in row order.
    table = data.dataset.data
    kept = table.column("status").to_numpy() <= Status.TRUNCATED
    lengths = np.asarray(table.column("num_tokens").to_numpy(), dtype=np.int64)[kept][rows]
    return [rows[pack] for pack in pack_by_length(lengths, config.row_length)]


def epoch_items(data: TokenizedSFT, config: DataConfig) -> int:
    """Items (samples, or packed rows with ``pack_sequences``) in one epoch before cutting."""
    if config.pack_sequences:
        return len(packs_for(data, config))
    rows = loader_rows(data, config)
    return rows if isinstance(rows, int) else len(rows)


def build_sft_loader(data: TokenizedSFT, config: DataConfig, *, pad_id: int, dp_rank: int,
                     dp_size: int, consumed_samples: int = 0, num_epochs: int | None = 1,
                     drop_last: bool = True, num_workers: int = 0,
                     epoch_multiple: int | None = None) -> torch.utils.data.DataLoader:
    """Micro-batches of this data-parallel rank, resumed after ``consumed_samples`` (global).

    Visits every kept sample once per epoch, or, when ``config.active_set`` names a file, the
    samples it lists, each as often as it is listed. With ``config.pack_sequences`` the items
    are packed rows (:mod:`megatron_wmss.data.packing`): ``micro_batch_size`` and
    ``consumed_samples`` count rows. ``epoch_multiple``: see :class:`DistributedEpochSampler`
    (the trainer drops the part of an epoch that does not fill a global batch).
    """
    import torch

    if config.pack_sequences:
        from megatron_wmss.data.packing import PackedSFTDataset, collate_packed

        packs = packs_for(data, config)
        items: int | np.ndarray = len(packs)
        dataset = PackedSFTDataset(SFTDataset(data), packs)
        collate = functools.partial(collate_packed, pad_id=pad_id, length=config.row_length)
    else:
        items = loader_rows(data, config)
        dataset = SFTDataset(data)
        collate = functools.partial(collate_sft, pad_id=pad_id,
                                    pad_to_multiple_of=config.pad_to_multiple_of,
                                    pad_to_length=config.padded_length)
    sampler = DistributedEpochSampler(
        items, micro_batch_size=config.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=config.seed, consumed_samples=consumed_samples, shuffle=config.shuffle,
        drop_last=drop_last, num_epochs=num_epochs, epoch_multiple=epoch_multiple)
    # Its own generator: each iter() draws a worker base seed, which from torch's global RNG
    # would shift the dropout masks of a resumed run (it starts iterating after the RNG
    # restore, the uninterrupted run before its first step).
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(config.seed))
