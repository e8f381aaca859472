"""Tokenization: completion-only supervision, EOS, over-length policy, caching, parallel map."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_wmss.config.vocab import padded_vocab_size
from megatron_wmss.data import DataConfig, DataFormatError, Status, collate_sft, tokenize_sft
from megatron_wmss.data import tokenization as tokenization_module
from megatron_wmss.data.tokenizers import load_tokenizer
from tests.unit.data_fixtures import (  # noqa: F401  (fixtures)
    COMPLETIONS,
    HF_CHAT_TEMPLATE,
    IM_CHAT_TEMPLATE,
    PROMPTS,
    build_hf_tokenizer,
    cache_dir,
    hf_tokenizer,
    rows_for,
    sp_tokenizer,
    tokenizer,
    write_rows,
)

SCHEMA_NAMES = ["chat", "prompt_completion", "question_answer", "instruction_output"]


def _targets(sample) -> list[list[int]]:
    """Label-side view: the supervised next-token targets of each reply, from collate."""
    batch = collate_sft([sample], pad_id=0)
    labels = batch["labels"][0]
    targets = labels[labels != -100].tolist()
    assert batch["loss_mask"][0].sum().item() == len(targets)
    return targets


@pytest.mark.parametrize("schema", SCHEMA_NAMES)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_loss_masked_tokens_decode_to_the_completion(tmp_path, cache_dir, tokenizer, schema,
                                                     suffix):
    path = write_rows(tmp_path / f"data{suffix}", rows_for(schema))
    data = tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir), tokenizer)
    assert data.summary.kept == len(COMPLETIONS) and data.summary.truncated == 0
    for row, completion in enumerate(COMPLETIONS):
        targets = _targets(data.dataset.with_format("numpy")[row])
        assert targets[-1] == tokenizer.eos_id
        assert tokenizer.decode(targets[:-1]) == completion
        # The prompt is in the input but never a target.
        ids = data.dataset[row]["input_ids"]
        assert PROMPTS[row] in tokenizer.decode(ids)


def test_multi_turn_chat_supervises_every_reply(tmp_path, cache_dir, tokenizer):
    replies = ["First reply.", "  Second, with spaces  "]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": replies[1]}]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir), tokenizer)
    targets = _targets(data.dataset.with_format("numpy")[0])
    eos_positions = [i for i, t in enumerate(targets) if t == tokenizer.eos_id]
    assert eos_positions[-1] == len(targets) - 1 and len(eos_positions) == 2
    first, second = targets[: eos_positions[0]], targets[eos_positions[0] + 1: -1]
    assert [tokenizer.decode(first), tokenizer.decode(second)] == replies


def test_eos_appended_when_template_closes_turns_with_another_token(tmp_path, cache_dir):
    tok = load_tokenizer(build_hf_tokenizer(tmp_path / "im", chat_template=IM_CHAT_TEMPLATE))
    ids, mask = tok.encode_chat([{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A b"}])
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised[-1] == tok.eos_id
    assert tok.decode(supervised[:-1]) == "A b<|im_end|>\n"
    # The generation prompt of inference is exactly the unsupervised prefix of training.
    prompt_ids, _ = tok.encode_chat([{"role": "user", "content": "Q"}], add_generation_prompt=True)
    assert ids[: len(prompt_ids)] == prompt_ids and not any(mask[: len(prompt_ids)])


def test_generation_prompt_is_the_training_prefix(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt_ids, prompt_mask = tokenizer.encode_chat(messages, add_generation_prompt=True)
    ids, mask = tokenizer.encode_chat(messages + [{"role": "assistant", "content": "R"}])
    assert ids[: len(prompt_ids)] == prompt_ids and not any(prompt_mask)
    assert all(mask[len(prompt_ids):]) and len(ids) > len(prompt_ids)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlength_policy_is_counted(tmp_path, cache_dir, sp_tokenizer, policy, caplog):
    long_row = {"prompt": "Short prompt.", "completion": "word " * 200}
    huge_prompt = {"prompt": "word " * 200, "completion": "ok"}
    rows = rows_for("prompt_completion", 2) + [long_row, huge_prompt]
    path = write_rows(tmp_path / "d.jsonl", rows)
    config = DataConfig(paths=[path], max_length=64, overlength=policy, cache_dir=cache_dir)
    with caplog.at_level("INFO", logger="megatron_wmss.data.tokenization"):
        data = tokenize_sft(config, sp_tokenizer)
    s = data.summary
    # Nothing is lost quietly: the summary is logged as a warning.
    assert caplog.records[-1].levelname == "WARNING" and str(s) in caplog.text
    assert s.total == 4 and s.kept + s.dropped_overlength + s.dropped_prompt_too_long == 4
    if policy == "truncate":
        assert (s.kept, s.truncated, s.dropped_prompt_too_long) == (3, 1, 1)
        assert data.not_kept == {3: "dropped_prompt_too_long"}
        row = int(np.flatnonzero(data.idx == 2)[0])
        assert data.dataset[row]["num_tokens"] == 64
        assert data.dataset[row]["status"] == Status.TRUNCATED
    else:
        assert (s.kept, s.truncated, s.dropped_overlength) == (2, 0, 2)
        assert data.not_kept == {2: "dropped_overlength", 3: "dropped_overlength"}
    assert max(data.dataset["num_tokens"]) <= 64
    assert sorted(data.idx.tolist()) == [i for i in range(4) if i not in data.not_kept]


def test_empty_completion_is_skipped_and_counted_or_strict_error(tmp_path, cache_dir,
                                                                 sp_tokenizer):
    rows = rows_for("prompt_completion", 3)
    rows[1]["completion"] = "  \n"
    path = write_rows(tmp_path / "d.jsonl", rows)
    data = tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir), sp_tokenizer)
    assert (data.summary.kept, data.summary.skipped_empty) == (2, 1)
    assert data.idx.tolist() == [0, 2] and data.not_kept == {1: "skipped_empty"}
    with pytest.raises(DataFormatError, match=r"empty completion \(idx 1\).*strict"):
        tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir, strict=True), sp_tokenizer)


def test_second_run_reads_the_cache(tmp_path, cache_dir, sp_tokenizer, monkeypatch):
    path = write_rows(tmp_path / "d.jsonl", rows_for("chat"))
    config = DataConfig(paths=[path], cache_dir=cache_dir)
    first = tokenize_sft(config, sp_tokenizer)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tokenization_module._TokenizeRows, "__call__", fail)
    second = tokenize_sft(config, sp_tokenizer)
    assert second.summary == first.summary
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    # A setting that changes the ids must miss the cache.
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir, max_length=16), sp_tokenizer)


def test_num_proc_gives_the_same_rows(tmp_path, cache_dir, hf_tokenizer):
    path = write_rows(tmp_path / "d.jsonl", rows_for("prompt_completion", 40))
    one = tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir), hf_tokenizer)
    two = tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir, num_proc=2), hf_tokenizer)
    assert one.dataset.to_dict() == two.dataset.to_dict() and one.summary == two.summary


def test_padded_vocab_size_follows_the_shared_rule(tokenizer):
    for tp in (1, 2, 4):
        assert tokenizer.padded_vocab_size(tp) == padded_vocab_size(tokenizer.vocab_size, tp)
    assert max(tokenizer.eos_id, tokenizer.pad_id) < tokenizer.vocab_size


def test_template_that_already_ends_replies_with_eos_gets_no_second_one(tmp_path):
    template = HF_CHAT_TEMPLATE.replace("{{ eos_token }}", "{{ eos_token }}{{ '\\n' }}")
    tok = load_tokenizer(build_hf_tokenizer(tmp_path / "eos_nl", chat_template=template))
    ids, mask = tok.encode_chat([{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}])
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised.count(tok.eos_id) == 1 and tok.decode(supervised) == "A</s>\n"


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Upper-cases whichever message is last, so a prefix renders differently on its own.
    template = ("{%- for m in messages -%}{{ m['role'] }}: {% if loop.last %}"
                "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
                "\n{%- endfor -%}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = load_tokenizer(build_hf_tokenizer(tmp_path / "unstable", chat_template=template))
    with pytest.raises(ValueError, match="not prefix-stable at message 1"):
        tok.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
