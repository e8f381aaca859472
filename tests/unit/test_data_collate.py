"""Batching: padding, next-token labels, masks, and the loader over DP ranks and active sets."""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.data import (
    DataConfig,
    DataFormatError,
    build_sft_loader,
    collate_sft,
    tokenize_sft,
    write_active_set,
)
from tests.unit.data_fixtures import (  # noqa: F401  (fixtures)
    cache_dir,
    rows_for,
    sp_tokenizer,
    write_rows,
)
from tests.unit.data_fixtures import tokenized_sample as _sample


def test_labels_are_next_token_targets_on_completion_only():
    samples = [_sample([10, 11, 12, 13, 2], [0, 0, 1, 1, 1], 5),
               _sample([20, 21, 22], [0, 1, 1], 9)]
    batch = collate_sft(samples, pad_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (2, 8), "labels": (2, 8), "loss_mask": (2, 8), "attention_mask": (2, 8),
        "position_ids": (2, 8), "idx": (2,)}
    assert batch["tokens"].tolist() == [[10, 11, 12, 13, 2, 0, 0, 0], [20, 21, 22, 0, 0, 0, 0, 0]]
    # The logit at position t predicts token t+1.
    assert batch["labels"].tolist() == [[-100, 12, 13, 2, -100, -100, -100, -100],
                                        [21, 22, -100, -100, -100, -100, -100, -100]]
    assert batch["loss_mask"].tolist() == (batch["labels"] != -100).float().tolist()
    assert batch["loss_mask"].dtype == torch.float32 and batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [5, 3]
    assert batch["position_ids"][1].tolist() == list(range(8))
    assert batch["idx"].tolist() == [5, 9]


@pytest.mark.parametrize("longest, multiple, expected", [(8, 8, 8), (9, 8, 16), (5, 1, 5),
                                                         (17, 16, 32)])
def test_padding_rounds_the_longest_sample_up(longest, multiple, expected):
    batch = collate_sft([_sample([1] * longest, [0] + [1] * (longest - 1), 0)], pad_id=3,
                        pad_to_multiple_of=multiple)
    assert batch["tokens"].shape == (1, expected)
    assert (batch["tokens"][0, longest:] == 3).all()


def test_fixed_length_padding_and_its_error():
    batch = collate_sft([_sample([1, 2, 3], [0, 1, 1], 0)], pad_id=0, pad_to_length=16)
    assert batch["tokens"].shape == (1, 16)
    with pytest.raises(ValueError, match="17 tokens does not fit pad_to_length = 16"):
        collate_sft([_sample([1] * 17, [1] * 17, 0)], pad_id=0, pad_to_length=16)


def _loader_idx(loader) -> list[list[int]]:
    return [batch["idx"].tolist() for batch in loader]


def test_loader_shards_an_epoch_and_resumes(tmp_path, cache_dir, sp_tokenizer):
    path = write_rows(tmp_path / "d.jsonl", rows_for("chat", 16, with_idx=True))
    config = DataConfig(paths=[path], cache_dir=cache_dir, micro_batch_size=2, max_length=128)
    data = tokenize_sft(config, sp_tokenizer)
    ranks = [_loader_idx(build_sft_loader(data, config, pad_id=sp_tokenizer.pad_id, dp_rank=r,
                                          dp_size=2)) for r in range(2)]
    assert sorted(i for rank in ranks for b in rank for i in b) == list(range(100, 116))
    resumed = _loader_idx(build_sft_loader(data, config, pad_id=sp_tokenizer.pad_id, dp_rank=1,
                                           dp_size=2, consumed_samples=8))
    assert resumed == ranks[1][2:]
    batch = next(iter(build_sft_loader(data, config, pad_id=sp_tokenizer.pad_id, dp_rank=0,
                                       dp_size=1)))
    assert batch["tokens"].shape[1] % 8 == 0 and batch["loss_mask"].sum() > 0


def test_loader_reads_an_active_set_with_multiplicity(tmp_path, cache_dir, sp_tokenizer):
    path = write_rows(tmp_path / "d.jsonl", rows_for("prompt_completion", 6, with_idx=True))
    active = str(tmp_path / "active.json")
    write_active_set(active, [103, 103, 100, 105])
    config = DataConfig(paths=[path], cache_dir=cache_dir, micro_batch_size=2,
                        active_set=active, pad_to_max_length=True, max_length=100)
    data = tokenize_sft(config, sp_tokenizer)
    batches = list(build_sft_loader(data, config, pad_id=sp_tokenizer.pad_id, dp_rank=0,
                                    dp_size=1))
    assert sorted(i for b in batches for i in b["idx"].tolist()) == [100, 103, 103, 105]
    assert {b["tokens"].shape[1] for b in batches} == {104}  # max_length rounded up to 8
    write_active_set(active, [100, 42])
    with pytest.raises(DataFormatError, match=r"active.json: 1 idx not among the 6 kept samples: "
                                              r"42 \(unknown idx\)"):
        build_sft_loader(data, config, pad_id=0, dp_rank=0, dp_size=1)
