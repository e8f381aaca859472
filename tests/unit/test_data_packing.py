"""Sequence packing: which samples share a row, how a row is laid out, its mask and THD bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_wmss.data import DataConfig, build_sft_loader, collate_sft, tokenize_sft
from megatron_wmss.data.collate import epoch_items
from megatron_wmss.data.packing import (
    collate_packed,
    pack_by_length,
    packed_attention_mask,
    packed_seq_params,
)
from tests.unit.data_fixtures import (  # noqa: F401  (fixtures)
    cache_dir,
    rows_for,
    sp_tokenizer,
    write_rows,
)
from tests.unit.data_fixtures import tokenized_sample as _sample


@pytest.mark.parametrize("seed", range(5))
def test_packs_cover_every_sample_once_within_capacity_and_nearly_optimally(seed):
    capacity = 4096
    gen = np.random.default_rng(seed)
    # Long reasoning traces: log-normal, median about a quarter of the longest.
    lengths = np.clip(gen.lognormal(math.log(capacity / 4), 0.8, 300), 16, capacity).astype(int)
    packs = pack_by_length(lengths, capacity)
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(int(lengths[p].sum()) <= capacity for p in packs)
    assert all(np.all(np.diff(p) > 0) for p in packs)  # positions in the data's order
    # First-fit/best-fit decreasing use at most 11/9·OPT + 1 bins; OPT >= total / capacity.
    assert len(packs) <= 11 / 9 * math.ceil(lengths.sum() / capacity) + 1
    assert [p.tolist() for p in pack_by_length(lengths, capacity)] == \
        [p.tolist() for p in packs]  # deterministic


def test_a_sample_longer_than_a_row_is_named():
    with pytest.raises(ValueError, match="sample at position 2 has 9 tokens, more than a packed "
                                         "row holds \\(8\\)"):
        pack_by_length([3, 4, 9, 1], 8)


def test_packed_row_holds_each_sample_as_its_own_padded_row_would():
    samples = [_sample([10, 11, 12, 13, 2], [0, 0, 1, 1, 1], 5),
               _sample([20, 21, 22], [0, 1, 1], 9),
               _sample([30, 31], [1, 1], 4)]
    batch = collate_packed([samples[:2], samples[2:]], pad_id=0, length=10)
    assert batch["tokens"].tolist() == [[10, 11, 12, 13, 2, 20, 21, 22, 0, 0],
                                        [30, 31, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1, -1],
                                             [0, 0, -1, -1, -1, -1, -1, -1, -1, -1]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    assert batch["sample_idx"].tolist() == [5, 9, 4] and batch["idx"].tolist() == [5, 4]
    assert batch["attention_mask"].sum().item() == 10
    # Each sample's labels are exactly its own padded row's: no target crosses a boundary.
    for row, start, sample in [(0, 0, samples[0]), (0, 5, samples[1]), (1, 0, samples[2])]:
        alone = collate_sft([sample], pad_id=0)["labels"][0]
        n = len(sample["input_ids"])
        assert batch["labels"][row, start:start + n].tolist() == alone[:n].tolist()
    assert batch["labels"][0, 4].item() == -100  # last token of sample 5 predicts nothing
    assert (batch["loss_mask"] == (batch["labels"] != -100)).all()
    with pytest.raises(ValueError, match="a pack of 8 tokens does not fit a row of 6"):
        collate_packed([samples[:2]], pad_id=0, length=6)


def test_packed_attention_mask_is_causal_within_each_sample_only():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    mask = packed_attention_mask(segments)
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = k <= q and segments[b, q] == segments[b, k]
                assert bool(mask[b, 0, q, k]) == (not allowed), (b, q, k)


def test_thd_bounds_split_every_sample_and_every_row():
    pytest.importorskip("megatron.core")
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    params = packed_seq_params(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 12]
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == params.max_seqlen_kv == 4


def test_packed_loader_visits_every_sample_once_per_epoch(tmp_path, cache_dir, sp_tokenizer):
    path = write_rows(tmp_path / "d.jsonl", rows_for("chat", 16, with_idx=True))
    config = DataConfig(paths=[path], cache_dir=cache_dir, micro_batch_size=2, max_length=200,
                        pack_sequences=True)
    data = tokenize_sft(config, sp_tokenizer)
    rows = epoch_items(data, config)
    assert rows < len(data)  # short chat samples: several per row
    seen, row_count = [], 0
    for rank in range(2):
        for batch in build_sft_loader(data, config, pad_id=sp_tokenizer.pad_id, dp_rank=rank,
                                      dp_size=2, drop_last=False):
            assert batch["tokens"].shape == (batch["tokens"].shape[0], config.row_length)
            assert batch["tokens"].shape[0] <= config.micro_batch_size  # rows, not samples
            seen += batch["sample_idx"].tolist()
            row_count += batch["tokens"].shape[0]
    assert sorted(seen) == list(range(100, 116)) and row_count == rows


def test_packs_hold_the_lengths_of_kept_samples_when_some_are_not_kept(tmp_path, cache_dir,
                                                                     sp_tokenizer):
    # Long and short samples alternate; an empty completion (not kept) in the middle made the
    # packer read every later sample's length from its neighbour: rows of 2x their capacity.
    rows = [{"idx": i, "prompt": "Q?", "completion": ("word " * (60 if i % 2 else 2)).strip()}
            for i in range(12)]
    rows[3]["completion"] = ""
    config = DataConfig(paths=[write_rows(tmp_path / "d.jsonl", rows)], cache_dir=cache_dir,
                        micro_batch_size=1, max_length=100, pack_sequences=True)
    data = tokenize_sft(config, sp_tokenizer)
    assert data.summary.skipped_empty == 1
    from megatron_wmss.data.collate import packs_for

    lengths = np.asarray(data.dataset.with_format("numpy")["num_tokens"])
    assert max(lengths) > config.row_length / 2  # two long samples never fit one row
    packs = packs_for(data, config)
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(data)))
    assert max(int(lengths[pack].sum()) for pack in packs) <= config.row_length
