"""A byte-level BPE built the way Qwen's is, trained here on a small corpus, with a ChatML template.

Qwen2/Qwen3 tokenizers split text with one regular expression (below, as in their
tokenizer.json) and then map bytes to printable characters (GPT-2's byte-level scheme) before
BPE; ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` are special tokens. The chat template
is ChatML as Qwen renders a plain conversation. Nothing is downloaded: the vocabulary is learned
from ``CORPUS`` in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2/Qwen3's pre-tokenizer pattern (contractions, letters, single digits, punctuation runs,
#: newline runs with the spaces before them, other whitespace).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "The answer is 42.\n\nSo we get  \\boxed{7}.\n",
    "你好，世界！数学题：12 + 30 = 42。\n",
    "  leading spaces\n\n\nthree newlines\tand a tab",
    "Hello world, hello there! It's 3.14159, isn't it?\n",
]

#: (user, assistant) pairs whose boundaries a byte-level BPE can merge across: replies starting
#: with newlines, spaces, tabs, digits, CJK, code; prompts ending in spaces or newlines.
TRICKY = [
    ("What is 2+2?", "The answer is 42."),
    ("q", "\nleading newline"),
    ("q", "\n\nTwo newlines, then text"),
    ("q", " leading space"),
    ("q", "  two spaces"),
    ("q", "\t tab first"),
    ("q", "123 digits first"),
    ("数学", "你好，世界"),
    ("Write add.", "    return a + b\n"),
    ("trailing space ", "x"),
    ("trailing newline\n", "\n"),
    ("code:\n```", "```python\ndef f():\n    pass\n```"),
]


def build_tokenizer(directory: str | Path, eos: str = "<|im_end|>") -> Path:
    """Train the BPE and save it with the template as an HF tokenizer directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos,
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    directory = Path(directory)
    fast.save_pretrained(directory)
    return directory


def chat_rows(pairs=TRICKY) -> list[dict]:
    return [{"idx": i, "messages": [{"role": "user", "content": u},
                                    {"role": "assistant", "content": a}]}
            for i, (u, a) in enumerate(pairs)]


def write_chat_jsonl(path: str | Path, pairs=TRICKY) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(pairs)), encoding="utf-8")
    return path
