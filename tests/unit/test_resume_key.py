"""The resume key: every setting and file that decides the data stream or the objective is in
it, and a rerun that changed one is refused in one line naming it (the trainer raises this
error on every rank before building a model; tests/distributed/test_trainer_resume.py checks
the command line's exit code 2 with it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_wmss.config.recipe import RecipeError
from tests.unit.data_fixtures import sp_tokenizer, train_sp  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = "iter_0000008"


@pytest.fixture
def inputs(tmp_path):
    """Copies of the tiny recipe's data and tokenizer, which the tests then edit in place."""
    data = tmp_path / "in" / "data.jsonl"
    tokenizer = tmp_path / "in" / "tok.model"
    data.parent.mkdir()
    shutil.copy(REPO / "examples" / "data" / "tiny_sft.jsonl", data)
    shutil.copy(REPO / "examples" / "data" / "tiny_sp.model", tokenizer)
    return data, tokenizer


def _key(tmp_path, data_path, tokenizer_path, overrides=None):
    from megatron_wmss.config.recipe import apply_overrides
    from megatron_wmss.data import load_tokenizer, tokenize_sft
    from megatron_wmss.data.collate import epoch_items
    from megatron_wmss.training.recipe import build_recipe, resolve_model
    from megatron_wmss.training.resume_key import resume_key

    raw = yaml.safe_load((REPO / "examples" / "recipes" / "tiny-sft.yaml").read_text())
    raw["data"]["paths"] = [str(data_path)]
    raw["data"]["cache_dir"] = str(tmp_path / "cache")  # as RUN_DIR/data-cache: reused
    raw["tokenizer"]["path"] = str(tokenizer_path)
    raw["trainer"]["train_steps"] = 8  # total steps stay 8 whatever the data: the bug's setup
    recipe = build_recipe("sft", apply_overrides(raw, list(overrides or ())),
                          str(tmp_path / "run"))
    tokenizer = load_tokenizer(recipe.tokenizer)
    data = tokenize_sft(recipe.data, tokenizer)
    resolve_model(recipe, tokenizer.vocab_size)
    items = epoch_items(data, recipe.data)
    return resume_key(recipe, tokenizer, data, recipe.data, items_per_epoch=items,
                      total_steps=recipe.total_steps(items))


def _refusal(saved, now) -> str:
    from megatron_wmss.training.resume_key import check_resume_key

    with pytest.raises(RecipeError) as err:
        check_resume_key(saved, now, f"runs/x/checkpoints/{CHECKPOINT}")
    message = str(err.value)
    assert "\n" not in message
    return message


def _replace_a_completion(path: Path) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    row["completion"] += " (edited)"
    lines[3] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("override, want", [
    ("data.pack_sequences=true", "data.pack_sequences changed from False to True"),
    ("data.pad_to_multiple_of=16", "data.pad_to_multiple_of changed from 8 to 16"),
    ("data.max_length=64", "data.max_length changed from 96 to 64"),
    ("data.overlength=drop", "data.overlength changed from 'truncate' to 'drop'"),
    ("model.hidden_dropout=0.1", "model.hidden_dropout changed from 0.0 to 0.1"),
], ids=["pack_sequences", "pad_to_multiple_of", "max_length", "overlength", "dropout"])
def test_a_changed_setting_is_refused_in_one_line_naming_it(tmp_path, inputs, override, want):
    saved = _key(tmp_path, *inputs)
    message = _refusal(saved, _key(tmp_path, *inputs, [override]))
    assert message == (f"resume: {want} since checkpoint {CHECKPOINT}; start a new run "
                       "directory (or restore the old setting)")


def test_changed_tokenizer_or_data_file_contents_are_refused(tmp_path, inputs, sp_tokenizer):
    data, tokenizer = inputs
    saved = _key(tmp_path, data, tokenizer)
    # Another SentencePiece model under the same file name.
    shutil.copy(sp_tokenizer.name, tokenizer)
    message = _refusal(saved, _key(tmp_path, data, tokenizer))
    assert message.startswith(f"resume: tokenizer.fingerprint (vocabulary and chat template) "
                              f"changed from {saved['tokenizer']['fingerprint'][:12]} to ")
    shutil.copy(REPO / "examples" / "data" / "tiny_sp.model", tokenizer)
    # One completion edited in the same data file: same count of samples, other tokens.
    _replace_a_completion(data)
    now = _key(tmp_path, data, tokenizer)
    assert now["data"]["items_per_epoch"] == saved["data"]["items_per_epoch"]
    assert _refusal(saved, now).startswith(
        "resume: data.samples_sha256 (the tokenized samples of data.paths) changed from "
        f"{saved['data']['samples_sha256'][:12]} to {now['data']['samples_sha256'][:12]} since "
        f"checkpoint {CHECKPOINT}")


def test_the_same_contents_elsewhere_resume_and_old_checkpoints_list_what_they_lack(
        tmp_path, inputs):
    from megatron_wmss.training.resume_key import check_resume_key

    saved = _key(tmp_path, *inputs)
    moved = tmp_path / "moved"
    shutil.copytree(inputs[0].parent, moved)  # new paths, new mtimes: a new tokenization cache
    now = _key(tmp_path, moved / "data.jsonl", moved / "tok.model")
    assert now == saved and check_resume_key(saved, now, CHECKPOINT) == []
    # A key as checkpoints written before these fields existed hold it: accepted (the trainer
    # warns with the list), what it does record is still compared.
    old = json.loads(json.dumps(saved))
    del old["tokenizer"]
    for name in ("pack_sequences", "pad_to_multiple_of", "items_per_epoch", "samples_sha256"):
        del old["data"][name]
    for name in ("hidden_dropout", "attention_dropout"):
        del old["model"][name]
    old["data"]["paths"] = ["elsewhere.jsonl"]  # no longer part of the key
    assert check_resume_key(old, now, CHECKPOINT) == [
        "tokenizer.fingerprint", "data.pack_sequences", "data.pad_to_multiple_of",
        "data.items_per_epoch", "data.samples_sha256"]
    dropout = json.loads(json.dumps(now))
    dropout["model"]["attention_dropout"] = 0.1  # those checkpoints trained without dropout
    assert "model.attention_dropout changed from 0.0 to 0.1" in _refusal(old, dropout)
    assert "optim.lr changed from 0.003 to 0.5" in _refusal(
        old, {**now, "optim": {**now["optim"], "lr": 0.5}})


def test_the_samples_digest_ignores_chunking_and_sees_one_mask_bit():
    import pyarrow as pa

    from megatron_wmss.training.resume_key import _table_sha256

    def table(masks):
        return pa.table({"idx": pa.array(range(len(masks)), pa.int64()),
                         "status": pa.array([0] * len(masks), pa.int8()),
                         "input_ids": pa.array([list(range(len(m))) for m in masks],
                                               pa.list_(pa.int32())),
                         "assistant_mask": pa.array(masks, pa.list_(pa.bool_()))})

    masks = [[i % 3 == 0 for i in range(n)] for n in (5, 13, 2, 9)]
    whole = table(masks)
    # As a num_proc tokenization caches it: other chunks, sliced at odd bit offsets.
    pieces = pa.concat_tables([whole.slice(0, 1), whole.slice(1, 2), whole.slice(3)])
    assert pieces.column("assistant_mask").num_chunks == 3
    assert _table_sha256(pieces) == _table_sha256(whole.combine_chunks())
    masks[1][7] = not masks[1][7]
    assert _table_sha256(table(masks)) != _table_sha256(whole)
