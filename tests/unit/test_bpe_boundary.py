"""Token ids at the prompt/reply boundary with a byte-level BPE built like Qwen's (issue [P]).

HF/TRL train on the rendered conversation encoded at once; this project must feed the same ids,
and supervise exactly the tokens that reach into a reply. The reference is transformers' own
``apply_chat_template`` + tokenizer call on the same directory.
"""

from __future__ import annotations

import pytest

from tests.bpe_fixture import TRICKY, build_tokenizer, write_chat_jsonl


@pytest.fixture(scope="module", params=["<|im_end|>", "<|endoftext|>"],
                ids=["eos-im_end", "eos-endoftext"])
def tokenizers(request, tmp_path_factory):
    """(our ChatTokenizer, transformers' tokenizer) of one directory; EOS as Qwen's instruct
    models set it (<|im_end|>) and as its base models do (<|endoftext|>)."""
    from transformers import AutoTokenizer

    from megatron_wmss.data import load_tokenizer

    directory = build_tokenizer(tmp_path_factory.mktemp("bpe"), eos=request.param)
    return load_tokenizer(str(directory)), AutoTokenizer.from_pretrained(directory)


def _messages(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _whole(hf, messages, **kw):
    return hf(hf.apply_chat_template(messages, tokenize=False, **kw),
              add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("user, reply", TRICKY)
def test_ids_are_those_of_the_conversation_encoded_at_once(tokenizers, user, reply):
    ours, hf = tokenizers
    ids, mask = ours.encode_chat(_messages(user, reply))
    whole = _whole(hf, _messages(user, reply))
    # The reply closes with <|im_end|>; where that is not EOS, EOS is appended to learn stopping.
    appended = [] if hf.eos_token == "<|im_end|>" else [hf.eos_token_id]
    assert ids == whole + appended
    # Supervised: a prompt-only prefix, then every token from the first one that reaches into
    # the reply (the text after the generation prompt) to the end.
    first = mask.index(True)
    assert mask == [False] * first + [True] * (len(ids) - first)
    prompt = hf.apply_chat_template(_messages(user, reply)[:1], tokenize=False,
                                    add_generation_prompt=True)
    before, through = hf.decode(whole[:first]), hf.decode(whole[:first + 1])
    assert prompt.startswith(before) and len(through) > len(prompt)


def test_encoding_prompt_and_reply_apart_changes_ids_where_a_merge_crosses(tokenizers):
    """Why the conversation is encoded at once: apart, the header's newline and a reply's
    leading newline cannot merge, and the ids differ from what HF/TRL train on."""
    from megatron_wmss.data.tokenizers import ChatTokenizer

    ours, hf = tokenizers
    differ = set()
    for user, reply in TRICKY:
        rendered = [ours._merged_pieces(_messages(user, reply), False)]
        apart = ChatTokenizer._encode_pieces(ours, rendered)[0][0]
        if apart != _whole(hf, _messages(user, reply)):
            differ.add(reply)
    assert differ == {reply for _, reply in TRICKY if reply.startswith("\n")}


@pytest.mark.parametrize("loss_on", ["completion", "all"])
def test_tokenized_rows_and_the_authors_prompt_length(tokenizers, loss_on, tmp_path):
    """loss_on=all supervises every token of the rendered conversation and appends nothing
    (TRL's SFTTrainer on `messages`); answer_start is the authors' prompt length: the user
    turn rendered without the generation prompt, encoded alone."""
    from megatron_wmss.data import DataConfig, tokenize_sft

    ours, hf = tokenizers
    pairs = [(u, a) for u, a in TRICKY if a.strip()]  # a blank reply is skipped, counted
    config = DataConfig(paths=[str(write_chat_jsonl(tmp_path / "chat.jsonl", pairs))],
                        max_length=512, cache_dir=str(tmp_path / "cache"), loss_on=loss_on)
    data = tokenize_sft(config, ours)
    assert data.summary.kept == len(pairs)
    for row, (user, reply) in zip(data.dataset, pairs):
        whole = _whole(hf, _messages(user, reply))
        prompt = _whole(hf, _messages(user, reply)[:1])
        assert row["answer_start"] == len(prompt)
        if loss_on == "all":
            assert row["input_ids"] == whole
            assert all(row["assistant_mask"]) and row["num_targets"] == len(whole) - 1
        else:
            assert row["input_ids"][:len(whole)] == whole
            assert not any(row["assistant_mask"][:row["answer_start"] + 3])  # + the header


def test_a_batch_with_nothing_to_encode_is_counted_not_a_crash(tokenizers, tmp_path):
    """Every reply blank: each row is skipped and counted, and the run says no sample is left."""
    from megatron_wmss.data import DataConfig, tokenize_sft
    from megatron_wmss.data.schemas import DataFormatError

    ours, _ = tokenizers
    assert ours.encode_chat_batch([]) == []
    config = DataConfig(paths=[str(write_chat_jsonl(tmp_path / "blank.jsonl",
                                                    [("q", " "), ("r", "\n")]))],
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFormatError, match="no sample is left after tokenization .*"
                                              "skipped_empty 2"):
        tokenize_sft(config, ours)
