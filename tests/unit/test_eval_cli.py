"""``wmss eval``: input errors say what to pass (before any model loads); pass@k estimator."""

from __future__ import annotations

import itertools
import json

import pytest

from megatron_wmss.cli import main
from megatron_wmss.evaluation.runner import pass_at_k

pytest.importorskip("lm_eval")


@pytest.fixture
def hf_dir(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return directory


def _error(capsys, *argv) -> str:
    assert main(["eval", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmss eval: error:") and err.count("\n") == 1, err
    return err


def test_unknown_task_lists_the_known_ones(capsys, hf_dir, tmp_path):
    err = _error(capsys, "--model", hf_dir, "--tasks", "aime26", "--out", tmp_path / "o")
    assert "aime26" in err and "aime25" in err and "humaneval" in err


def test_a_missing_data_file_names_the_file_and_the_option(capsys, hf_dir, tmp_path):
    (tmp_path / "data").mkdir()
    err = _error(capsys, "--model", hf_dir, "--tasks", "amc23", "--data-dir", tmp_path / "data",
                 "--out", tmp_path / "o")
    assert "amc23.jsonl" in err and "--data-dir" in err


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_code_tasks_need_the_opt_in(capsys, hf_dir, tmp_path, task):
    err = _error(capsys, "--model", hf_dir, "--tasks", f"gsm8k,{task}", "--out", tmp_path / "o")
    assert task in err and "--allow-code-execution" in err


def test_a_model_that_is_neither_kind_is_refused(capsys, tmp_path):
    err = _error(capsys, "--model", tmp_path, "--tasks", "gsm8k", "--out", tmp_path / "o")
    assert "config.json" in err and "metadata.json" in err


def test_backend_and_model_kind_must_agree(capsys, hf_dir, tmp_path):
    err = _error(capsys, "--model", hf_dir, "--backend", "megatron", "--tasks", "gsm8k",
                 "--out", tmp_path / "o")
    assert "wmss import-hf" in err


def test_pass_k_beyond_the_samples_is_refused(capsys, hf_dir, tmp_path):
    err = _error(capsys, "--model", hf_dir, "--tasks", "gsm8k", "--num-samples", 4,
                 "--pass-k", "1,8", "--out", tmp_path / "o")
    assert "--pass-k" in err and "8" in err


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_chance_that_k_draws_without_replacement_hit_one(n):
    # Closed form against enumeration: the fraction of k-subsets of n samples (c correct)
    # that hold at least one correct sample.
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(n, n + 1, 1)
