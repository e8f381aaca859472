"""Tiny Hugging Face models and tokenizers built by the tests themselves (no downloads): a random
Qwen3, and a scripted ChatML one whose greedy answers are fixed texts; small benchmark files in
the formats ``wmss eval`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_hf_tokenizer(directory: Path, ascii_only: bool = False):
    """Byte-level BPE (exact decode of any text) trained on a few lines, with EOS, pad and the
    chat template above; ~280 tokens. ``ascii_only``: the alphabet is printable ASCII, space,
    newline and tab, and the role markers are special tokens, so any id sequence decodes to
    whole characters (vLLM's detokenizer drops an incomplete UTF-8 tail that HF's keeps as
    U+FFFD) and both libraries skip the same tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = (["The answer is \\boxed{42}. def add(a, b):\n    return a + b\n"] * 5
              + [f"Question {i}: what is {i} + {i}? Answer: {2 * i}" for i in range(50)])
    alphabet = ([chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "ĉ"] if ascii_only
                else pre_tokenizers.ByteLevel.alphabet())  # byte-level names of " \n\t"
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=SPECIAL,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    extra = {"additional_special_tokens": SPECIAL[1:]} if ascii_only else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0],
                                   pad_token=SPECIAL[0], **extra)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_hf_model(directory: Path, seed: int = 0, head_dim: int = 16,
                  ascii_only: bool = False) -> Path:
    """A 2-layer Qwen3 (tied embeddings, q/k norm, GQA) with every weight random — norms and
    biases too — saved with its tokenizer, fp32. Returns ``directory``. vLLM's CPU attention
    takes head_dim 32, 64, 80, ... only (and ``ascii_only`` tokenizers: see above)."""
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_hf_tokenizer(directory, ascii_only)
    cfg = tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         vocab_size=len(tokenizer), max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = tf.Qwen3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(directory)
    return directory


CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                   "{% endif %}")


def make_chatml_tokenizer(directory: Path, corpus: list[str]):
    """Byte-level BPE trained on ``corpus`` with a ChatML template: EOS (and pad) is
    ``<|endoftext|>``; ``<|im_start|>`` and ``<|im_end|>`` are additional special tokens, so
    decoding with special tokens skipped drops them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0],
                                   pad_token=special[0], additional_special_tokens=special[1:])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_scripted_chat_model(directory: Path, scripts: list[tuple[str, str]]) -> Path:
    """An untied 1-layer Qwen3 with a ChatML tokenizer whose greedy continuation of each
    ``(prompt, continuation)`` in ``scripts`` is exactly the continuation's tokens, then EOS.

    Attention and MLP write nothing to the residual stream (zero output projections), so the
    last position's logits depend on the last token alone: each source token ``t`` gets its own
    basis vector as embedding and its scripted successor's ``lm_head`` row points along it
    (logit 80 against 0 for every other token). Tokens must have one successor across all
    scripts (ValueError otherwise). Returns ``directory``."""
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_chatml_tokenizer(directory, [p + c for p, c in scripts])
    successor: dict[int, int] = {}
    for prompt, continuation in scripts:
        ids = tokenizer.encode(prompt)[-1:] + tokenizer.encode(continuation)
        for src, dst in zip(ids, ids[1:] + [tokenizer.eos_token_id]):
            if successor.setdefault(src, dst) != dst:
                raise ValueError(f"token {tokenizer.decode([src])!r} is scripted to precede both "
                                 f"{tokenizer.decode([successor[src]])!r} and "
                                 f"{tokenizer.decode([dst])!r}; choose other texts")
    hidden = 64
    if len(successor) > hidden:
        raise ValueError(f"{len(successor)} scripted tokens need more than hidden={hidden} "
                         "basis vectors")
    cfg = tf.Qwen3Config(hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=len(tokenizer), max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight",
                              "lm_head.weight")):
                p.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for k, (src, dst) in enumerate(sorted(successor.items())):
            embed[src, k] = 1.0          # final RMSNorm turns it into 8 e_k
            head[dst, k] += 10.0
    model.save_pretrained(directory)
    return directory


MBPP_RECORDS = [  # MBPP format (google-research-datasets/mbpp), reference code passes
    {"task_id": 11, "text": "Write a function to add two numbers.",
     "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 2) == 3",
                                                            "assert add(-1, 1) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to square a number.",
     "code": "def square(x):\n    return x * x", "test_list": ["assert square(3) == 9"],
     "test_setup_code": "import math", "challenge_test_list": []},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_benchmark_files(directory: Path) -> Path:
    """``gsm8k.jsonl`` (question/answer) and ``mbpp.jsonl`` (task_id/text/code/test_list)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "gsm8k.jsonl", [
        {"question": f"Question {i}: what is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n"
         f"#### {2 * i}"} for i in range(1, 5)])
    write_jsonl(directory / "mbpp.jsonl", MBPP_RECORDS)
    return directory
