"""Tokenization throughput of the SFT pipeline (load + chat template + tokenize + validate).

    python bench/bench_tokenize.py [--samples 100000] [--num-proc N]

Writes N short prompt/completion samples as JSONL, builds a SentencePiece model (project
trainer) and a byte-level BPE HF tokenizer (``tokenizers``), then times ``tokenize_sft`` with
one process and with ``--num-proc`` processes, each into an empty cache, and the cached re-run.
Prints one JSON object; samples/s counts input rows per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets

from megatron_wmss.data import DataConfig, load_tokenizer, tokenize_sft
from megatron_wmss.data.train_tokenizer import train_sentencepiece

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.unit.data_fixtures import build_hf_tokenizer  # noqa: E402  (one tokenizer recipe)

WORDS = ("the of and to in is that for it as with was on be by this are or from at an which "
         "sum product prime number answer step solve equation value therefore thus 0 1 2 3 4 5 6 "
         "7 8 9 + - * = x y z def return print").split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_samples(path: Path, n: int, seed: int = 0) -> None:
    """``n`` prompt/completion rows: prompts of 5-20 words, completions of 10-60."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": _text(rng, 5, 20), "completion": _text(rng, 10, 60)})
                    + "\n")


def time_tokenize(data_file: Path, tokenizer, num_proc: int, cache_dir: Path) -> dict:
    config = DataConfig(paths=[str(data_file)], num_proc=num_proc, cache_dir=str(cache_dir),
                        max_length=512)
    start = time.perf_counter()
    data = tokenize_sft(config, tokenizer)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokenize_sft(config, tokenizer)  # same fingerprint: read from the datasets cache
    cached = time.perf_counter() - start
    n = data.summary.total
    return {"num_proc": num_proc, "seconds": round(first, 2),
            "samples_per_s": round(n / first), "tokens_per_s": round(data.summary.tokens / first),
            "cached_seconds": round(cached, 2), "kept": data.summary.kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_file = root / "samples.jsonl"
        write_samples(data_file, args.samples)
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(_text(random.Random(i), 10, 60) for i in range(2000)))
        tokenizers = {
            "sentencepiece": load_tokenizer(train_sentencepiece([str(corpus)], str(root / "sp"),
                                                                vocab_size=1024)),
            "hf_byte_bpe": load_tokenizer(build_hf_tokenizer(
                root / "hf", texts=corpus.read_text().splitlines(), vocab_size=1024)),
        }
        results = []
        for name, tokenizer in tokenizers.items():
            for num_proc in sorted({1, args.num_proc}):
                cache_dir = root / f"cache-{name}-{num_proc}"
                results.append({"tokenizer": name, **time_tokenize(data_file, tokenizer,
                                                                    num_proc, cache_dir)})
    print(json.dumps({"bench": "tokenize_sft", "samples": args.samples,
                      "cpu_count": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
