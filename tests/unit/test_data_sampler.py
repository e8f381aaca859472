"""Sampling: per-epoch shuffle from a seed, DP sharding, exact resume, active sets."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from megatron_wmss.data import (
    DataFormatError,
    DistributedEpochSampler,
    read_active_set,
    write_active_set,
)


def _sampler(rows, rank, dp, mbs=2, consumed=0, **kwargs):
    return DistributedEpochSampler(rows, micro_batch_size=mbs, dp_rank=rank, dp_size=dp, seed=7,
                                   consumed_samples=consumed, **kwargs)


def _global_sequence(rows, dp, mbs=2, consumed=0, **kwargs) -> list[int]:
    """Samples in the order all ranks take them together: step by step, rank by rank."""
    per_rank = [list(_sampler(rows, r, dp, mbs, consumed, **kwargs)) for r in range(dp)]
    assert len({len(p) for p in per_rank}) == 1, "ranks must run the same number of steps"
    return [s for step in zip(*per_rank) for batch in step for s in batch]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_one_epoch_over_ranks_is_the_dataset_without_overlap(dp):
    n, mbs = 48, 3
    per_rank = [[s for b in _sampler(n, r, dp, mbs) for s in b] for r in range(dp)]
    union = [s for part in per_rank for s in part]
    assert sorted(union) == list(range(n))
    assert all(len(set(a) & set(b)) == 0 for a in per_rank for b in per_rank if a is not b)
    assert [len(list(_sampler(n, r, dp, mbs))) for r in range(dp)] == \
           [len(_sampler(n, r, dp, mbs)) for r in range(dp)] == [n // (mbs * dp)] * dp


def test_tail_shorter_than_a_step_is_reported_or_kept():
    sampler = _sampler(50, 0, 4, mbs=3)  # 12 per global step: 48 used, 2 left out
    assert (sampler.samples_per_epoch, sampler.dropped_per_epoch) == (48, 2)
    kept_all = [[s for b in _sampler(50, r, 4, 3, drop_last=False) for s in b] for r in range(4)]
    assert sorted(s for part in kept_all for s in part) == list(range(50))
    assert [len(_sampler(50, r, 4, 3, drop_last=False)) for r in range(4)] == [5, 4, 4, 4]


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch():
    a = _global_sequence(32, 2, num_epochs=2)
    assert a == _global_sequence(32, 2, num_epochs=2)
    first, second = a[:32], a[32:]
    assert sorted(first) == sorted(second) == list(range(32)) and first != second
    other_seed = DistributedEpochSampler(32, micro_batch_size=2, dp_rank=0, dp_size=1, seed=8)
    assert [s for b in other_seed for s in b] != _global_sequence(32, 1)
    unshuffled = _global_sequence(32, 2, shuffle=False)
    assert unshuffled == list(range(32))


@pytest.mark.parametrize("consumed", [0, 4, 28, 32, 36, 60])
def test_resume_yields_exactly_the_remaining_sequence(consumed):
    full = _global_sequence(32, 2, num_epochs=2)
    resumed = _global_sequence(32, 2, consumed=consumed, num_epochs=2)
    assert resumed == full[consumed:]
    assert len(_sampler(32, 1, 2, consumed=consumed, num_epochs=2)) * 4 == len(full) - consumed


def test_resume_off_a_step_boundary_is_refused():
    with pytest.raises(ValueError, match="consumed_samples = 6 .* multiple of .* = 4"):
        _sampler(32, 0, 2, consumed=6)


def test_endless_sampler_continues_across_epochs():
    it = iter(_sampler(8, 0, 1, mbs=4, num_epochs=None))
    seen = [s for _ in range(6) for s in next(it)]
    assert Counter(seen) == Counter({i: 3 for i in range(8)})


def test_active_set_rows_keep_their_multiplicity():
    rows = [5, 5, 5, 1, 2, 2, 9, 0]
    seq = _global_sequence(rows, 2)
    assert Counter(seq) == Counter(rows)


@pytest.mark.parametrize("bad_arg", [dict(dp_rank=2), dict(micro_batch_size=0), dict(seed=-1)])
def test_bad_sampler_arguments_name_the_argument(bad_arg):
    args = dict(micro_batch_size=1, dp_rank=0, dp_size=2, seed=0) | bad_arg
    with pytest.raises(ValueError, match=next(iter(bad_arg))):
        DistributedEpochSampler(8, **args)


@pytest.mark.parametrize("text", [
    "[3, 1, 3, 7]",
    '{"idx": [3, 1, 3, 7], "unique": 3}',
    "3\n1\n\n3\n7\n",
    '{"idx": 3, "p": 0.1}\n{"idx": 1}\n{"idx": 3}\n{"idx": 7}\n',
])
def test_active_set_formats(tmp_path, text):
    path = tmp_path / "active.jsonl"
    path.write_text(text)
    assert read_active_set(str(path)).tolist() == [3, 1, 3, 7]


def test_active_set_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "active.json")
    write_active_set(path, np.array([4, 4, 2]))
    with open(path) as f:
        assert json.load(f) == [4, 4, 2]
    assert read_active_set(path).tolist() == [4, 4, 2]
    (tmp_path / "bad.jsonl").write_text("1\n2\n{oops\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: malformed JSON"):
        read_active_set(str(tmp_path / "bad.jsonl"))
    (tmp_path / "str.json").write_text('[1, "2"]')
    with pytest.raises(DataFormatError, match="'2' is not an integer idx"):
        read_active_set(str(tmp_path / "str.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="lists no idx"):
        read_active_set(str(tmp_path / "empty.json"))


def test_epoch_cut_to_whole_global_batches_gives_every_rank_equal_micro_batch_counts():
    # 23 samples, global batch 8 = micro 2 x dp 2 x 2 micro-batches: 7 samples dropped per
    # epoch, each rank yields 4 micro-batches per epoch (a hang if they differed).
    per_rank = [list(DistributedEpochSampler(23, micro_batch_size=2, dp_rank=r, dp_size=2,
                                             seed=0, num_epochs=2, epoch_multiple=8))
                for r in range(2)]
    assert [len(batches) for batches in per_rank] == [8, 8]
    first_epoch = {i for batches in per_rank for b in batches[:4] for i in b}
    assert len(first_epoch) == 16
    with pytest.raises(ValueError, match="epoch_multiple = 6 is invalid"):
        DistributedEpochSampler(23, micro_batch_size=2, dp_rank=0, dp_size=2, seed=0,
                                epoch_multiple=6)


def test_active_set_multiplicity_expands_to_that_many_occurrences(tmp_path):
    path = tmp_path / "active_set.jsonl"
    path.write_text('{"idx": 5, "multiplicity": 3, "draws": 3, "weight": 0.2}\n'
                    '{"idx": 2}\n{"idx": 9, "multiplicity": 1}\n')
    assert read_active_set(str(path)).tolist() == [5, 5, 5, 2, 9]
    # One line, a JSON array of objects: the same rule.
    path.write_text('{"idx": 4, "multiplicity": 2}\n')
    assert read_active_set(str(path)).tolist() == [4, 4]
    path.write_text('[{"idx": 1, "multiplicity": 2}, 3]')
    assert read_active_set(str(path)).tolist() == [1, 1, 3]


@pytest.mark.parametrize("multiplicity", ["0", "-1", "1.5", '"2"', "true", "null"])
def test_bad_multiplicity_names_file_and_line(tmp_path, multiplicity):
    path = tmp_path / "active_set.jsonl"
    path.write_text(f'{{"idx": 1}}\n{{"idx": 8, "multiplicity": {multiplicity}}}\n')
    with pytest.raises(DataFormatError, match=r"active_set.jsonl:2: active set entry for idx 8 "
                                              r"has multiplicity .*; accepted: an int >= 1"):
        read_active_set(str(path))
