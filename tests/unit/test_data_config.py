"""Config validation names the bad field and what is allowed; tokenizer loading and training."""

from __future__ import annotations

import json

import pytest

from megatron_wmss.config.vocab import padded_vocab_size
from megatron_wmss.data import DataConfig, TokenizerConfig, load_tokenizer
from megatron_wmss.data.train_tokenizer import main as train_tokenizer_main
from tests.unit.data_fixtures import rows_for, write_rows


def test_defaults_are_valid_and_a_single_path_is_accepted():
    config = DataConfig(paths="train.jsonl")
    assert config.paths == ["train.jsonl"] and config.padded_length is None
    assert DataConfig(paths=["a"], max_length=100, pad_to_max_length=True).padded_length == 104


@pytest.mark.parametrize("field, value, allowed", [
    ("paths", [], "non-empty list"),
    ("schema", "alpaca", "auto | chat | prompt_completion | question_answer | instruction_output"),
    ("max_length", 1, "int >= 2"),
    ("overlength", "clip", "truncate | drop"),
    ("num_proc", 0, "int >= 1"),
    ("micro_batch_size", True, "int >= 1"),
    ("strict", "yes", "true | false"),
    ("cache_dir", "", "null or a non-empty string"),
    ("seed", -3, "int >= 0"),
])
def test_bad_field_is_named_with_allowed_values(field, value, allowed):
    kwargs = {"paths": ["a.jsonl"], field: value}
    with pytest.raises(ValueError, match=rf"data\.{field} = .* is invalid; allowed: .*"
                                         rf"{allowed.replace('|', '[|]')}"):
        DataConfig(**kwargs)


def test_packing_fixes_the_row_length():
    config = DataConfig(paths=["a"], pack_sequences=True, max_length=100, pad_to_multiple_of=8)
    assert config.padded_length == config.row_length == 104
    assert DataConfig(paths=["a"], max_length=100).padded_length is None


def test_tokenizer_config_validation():
    with pytest.raises(ValueError, match="tokenizer.kind = 'tiktoken' is invalid; allowed: "
                                         "auto [|] hf [|] sentencepiece"):
        TokenizerConfig(path="t", kind="tiktoken")
    with pytest.raises(ValueError, match="tokenizer.chat_template"):
        TokenizerConfig(path="t.model", kind="sentencepiece", chat_template="x.jinja")


def test_hf_tokenizer_without_remote_code_by_default(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from tests.unit.data_fixtures import build_hf_tokenizer

    path = build_hf_tokenizer(tmp_path / "hf")
    seen = {}
    original = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(path)
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


def test_hf_chat_template_override_and_missing_template(tmp_path):
    from tests.unit.data_fixtures import IM_CHAT_TEMPLATE, build_hf_tokenizer

    path = build_hf_tokenizer(tmp_path / "hf", chat_template=None)
    with pytest.raises(ValueError, match="has no chat template; pass tokenizer.chat_template"):
        load_tokenizer(path)
    template = tmp_path / "im.jinja"
    template.write_text(IM_CHAT_TEMPLATE)
    tok = load_tokenizer(TokenizerConfig(path=path, chat_template=str(template)))
    ids, _ = tok.encode_chat([{"role": "user", "content": "Q"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_train_tokenizer_cli_on_jsonl_and_text(tmp_path, capsys):
    jsonl = write_rows(tmp_path / "corpus.jsonl", rows_for("chat") + rows_for("question_answer"))
    text = tmp_path / "extra.txt"
    text.write_text("plain text line\nanother line\n")
    prefix = tmp_path / "out" / "sp"
    assert train_tokenizer_main(["--input", jsonl, "--input", str(text), "--output-prefix",
                                 str(prefix), "--vocab-size", "400",
                                 "--tensor-parallel-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == f"{prefix}.model" and (tmp_path / "out" / "sp.vocab").exists()
    assert report["padded_vocab_size"] == padded_vocab_size(report["vocab_size"], 2) == 512
    tok = load_tokenizer(report["model"])
    assert tok.vocab_size == report["vocab_size"] <= 400
    assert (tok.eos_id, tok.pad_id) == (2, 3)
    assert tok.encode("<|assistant|>") == [tok.encode("<|assistant|>")[0]]  # one piece
    for text_ in ["never seen: ∮ ⌘ ü", "  two  spaces\tand tab\n"]:
        assert tok.decode(tok.encode(text_)) == text_


def test_train_tokenizer_rejects_a_too_small_vocab(tmp_path, capsys):
    code = train_tokenizer_main(["--input", "x.txt", "--output-prefix", str(tmp_path / "sp"),
                                 "--vocab-size", "100"])
    assert code == 2
    assert "vocab_size = 100 is invalid; allowed: >= 264" in capsys.readouterr().err
