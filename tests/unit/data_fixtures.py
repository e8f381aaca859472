"""Tiny, offline data fixtures: data files in every schema, a SentencePiece model trained here,
and an HF tokenizer built with the `tokenizers` library. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_wmss.data import load_tokenizer
from megatron_wmss.data.train_tokenizer import train_sentencepiece

# Completions exercise what must survive a round trip: leading and trailing whitespace,
# blank lines, tabs, digits, non-ASCII text and characters the tokenizers never saw.
COMPLETIONS = [
    "The answer is 4.",
    "  Leading spaces, then a blank line.\n\nAnd a trailing space ",
    "<think>\nStep 1: 12 * 7 = 84.\tDone.\n</think>\nSo \\boxed{84}.",
    "Unicode: é, 中文, emoji 🙂, and Ωμέγα",
    "def f(x):\n    return x * 2\n",
]
PROMPTS = [
    "What is 2 + 2?",
    "Say something with spaces.",
    "Compute 12 * 7.",
    "Write some unicode.",
    "Write a Python function that doubles x.",
]
SYSTEM = "You are a careful assistant."

# A chat template of the common shape; replies end with the EOS token.
HF_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}<|assistant|>\n{{ m['content'] }}{{ eos_token }}"
    "{%- else -%}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{% endif -%}"
)
# Qwen-style: turns close with <|im_end|>, which is not the EOS token.
IM_CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
)
HF_SPECIAL_TOKENS = ["<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    return (PROMPTS + COMPLETIONS + [SYSTEM]) * 4


def rows_for(schema: str, n: int = len(PROMPTS), with_idx: bool = False) -> list[dict]:
    """``n`` rows of ``schema``; idx (when asked) is 100 + row so it differs from row numbers."""
    rows = []
    for i in range(n):
        prompt, completion = PROMPTS[i % len(PROMPTS)], COMPLETIONS[i % len(COMPLETIONS)]
        row = {
            "chat": {"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": prompt},
                                  {"role": "assistant", "content": completion}]},
            "prompt_completion": {"prompt": prompt, "completion": completion},
            "question_answer": {"question": prompt, "answer": completion},
            "instruction_output": {"instruction": prompt, "input": "", "output": completion},
        }[schema]
        if with_idx:
            row = {"idx": 100 + i, **row}
        rows.append(row)
    return rows


def tokenized_sample(ids, mask, idx) -> dict:
    """One tokenized sample as the loader's dataset yields it."""
    import numpy as np

    return {"input_ids": np.array(ids, np.int32), "assistant_mask": np.array(mask, bool),
            "idx": idx}


def write_rows(path: Path, rows: list[dict]) -> str:
    """Write ``rows`` as JSON Lines, a JSON array or Parquet, by the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build_hf_tokenizer(directory: Path, chat_template: str = HF_CHAT_TEMPLATE,
                       texts: list[str] | None = None, vocab_size: int = 400) -> str:
    """Byte-level BPE trained on ``texts`` and saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   chat_template=chat_template)
    fast.save_pretrained(str(directory))
    return str(directory)


def train_sp(directory: Path, texts: list[str] | None = None, vocab_size: int = 400) -> str:
    """A small SentencePiece model trained with the project's own trainer."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus_file = directory / "corpus.txt"
    corpus_file.write_text("\n".join(texts or corpus()), encoding="utf-8")
    return train_sentencepiece([str(corpus_file)], str(directory / "sp"), vocab_size=vocab_size,
                               num_threads=1)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    return load_tokenizer(train_sp(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    return load_tokenizer(build_hf_tokenizer(tmp_path_factory.mktemp("hf")))


@pytest.fixture(params=["sentencepiece", "hf"])
def tokenizer(request, sp_tokenizer, hf_tokenizer):
    """Each test using it runs once per tokenizer kind."""
    return sp_tokenizer if request.param == "sentencepiece" else hf_tokenizer


@pytest.fixture
def cache_dir(tmp_path) -> str:
    path = tmp_path / "hf_cache"
    os.makedirs(path, exist_ok=True)
    return str(path)
