"""Regenerate the tiny example data: ``python examples/data/make_tiny_data.py``.

Writes ``tiny_sft.jsonl`` (256 synthetic prompt/completion pairs: additions written out in
words, with the worked answer) and ``tiny_sp.model`` (a SentencePiece tokenizer trained on
them). The recipes in ``examples/recipes/tiny-*.yaml`` train on these in seconds on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = "zero one two three four five six seven eight nine".split()


def samples(n: int = 256, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for idx in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt = f"What is {WORDS[a]} plus {WORDS[b]}?"
        total = a + b
        answer = WORDS[total] if total < 10 else f"one {WORDS[total - 10]}"
        completion = f"{WORDS[a]} plus {WORDS[b]} makes {answer}, so the answer is \\boxed{{{total}}}."
        out.append({"idx": idx, "prompt": prompt, "completion": completion})
    return out


def main() -> None:
    from megatron_wmss.data.train_tokenizer import train_sentencepiece

    rows = samples()
    data = HERE / "tiny_sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_sentencepiece([str(data)], str(HERE / "tiny_sp"), vocab_size=320)
    (HERE / "tiny_sp.vocab").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
