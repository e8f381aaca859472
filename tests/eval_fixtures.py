"""A tiny Hugging Face model and tokenizer built by the tests themselves (no downloads), and
small benchmark files in the formats ``wmss eval`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_hf_tokenizer(directory: Path):
    """Byte-level BPE (exact decode of any text) trained on a few lines, with EOS, pad and the
    chat template above; ~280 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = (["The answer is \\boxed{42}. def add(a, b):\n    return a + b\n"] * 5
              + [f"Question {i}: what is {i} + {i}? Answer: {2 * i}" for i in range(50)])
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0],
                                   pad_token=SPECIAL[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_hf_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen3 (tied embeddings, q/k norm, GQA) with every weight random — norms and
    biases too — saved with its tokenizer, fp32. Returns ``directory``."""
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_hf_tokenizer(directory)
    cfg = tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
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
