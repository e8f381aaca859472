"""Train a SentencePiece tokenizer for the built-in chat template on a text or JSONL corpus.

    python -m megatron_wmss.data.train_tokenizer --input data.jsonl --output-prefix tok/sp \\
        --vocab-size 4096

Text files contribute their lines; JSON Lines / JSON files contribute every message, prompt and
completion of rows in any accepted schema. The model round-trips any text exactly: identity
normalisation, whitespace kept, byte fallback for unseen characters. Prints a JSON summary.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence

from megatron_wmss.config.vocab import padded_vocab_size
from megatron_wmss.data.schemas import SCHEMA_FIELDS, detect_schema, row_to_messages
from megatron_wmss.data.sources import iter_json_records
from megatron_wmss.data.tokenizers import SP_ROLE_MARKERS
from megatron_wmss.platform.errors import ArgumentParser, run_command

__all__ = ["corpus_lines", "main", "train_sentencepiece"]

MODEL_TYPES = ("bpe", "unigram")
# SentencePiece skips training sentences longer than its max_sentence_length (bytes); long
# reasoning traces are therefore fed line by line, and lines are cut to this length.
_MAX_LINE_BYTES = 4096


def _row_texts(row: object, where: str) -> list[str]:
    if isinstance(row, str):
        return [row]
    if not isinstance(row, dict):
        return []
    if isinstance(row.get("text"), str):  # plain-text corpora ({"text": ...} rows)
        return [row["text"]]
    schema = detect_schema(row.keys(), "auto", where)
    if schema == "chat":
        return [m["content"] for m in row_to_messages("chat", row, where)]
    return [row[f] for f in SCHEMA_FIELDS[schema] if isinstance(row.get(f), str)]


def _file_texts(path: str) -> Iterator[str]:
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        for lineno, row in iter_json_records(path):
            yield from _row_texts(row, f"{path}:{lineno}")
    else:
        with open(path, encoding="utf-8") as f:
            yield from f


def corpus_lines(paths: Sequence[str]) -> Iterator[str]:
    """Non-empty lines (at most 4096 bytes each) of the texts in ``paths``."""
    for path in paths:
        for text in _file_texts(path):
            for line in text.splitlines():
                if line.strip():
                    yield line.encode("utf-8")[:_MAX_LINE_BYTES].decode("utf-8", "ignore")


def train_sentencepiece(inputs: Sequence[str], output_prefix: str, vocab_size: int = 8000,
                        model_type: str = "bpe", max_sentences: int = 1_000_000,
                        character_coverage: float = 0.9995, num_threads: int | None = None
                        ) -> str:
    """Train on ``inputs`` and write ``{output_prefix}.model`` (returned) and ``.vocab``.

    Ids: unk 0, bos 1, eos 2, pad 3, then the chat role markers, then learned pieces.
    ``vocab_size`` is an upper bound: a corpus too small for it yields a smaller vocabulary.
    Characters outside ``character_coverage`` (a fraction of the corpus) get no piece of their
    own and are encoded as UTF-8 bytes.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type = {model_type!r} is invalid; allowed: "
                         f"{' | '.join(MODEL_TYPES)}")
    # Byte fallback needs its 256 byte pieces + 4 specials + role markers inside the vocabulary.
    minimum = 256 + 4 + len(SP_ROLE_MARKERS) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size = {vocab_size} is invalid; allowed: >= {minimum} "
                         f"(byte fallback pieces, special ids and role markers)")
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing or not inputs:
        raise FileNotFoundError(f"tokenizer corpus file(s) not found: {missing or inputs}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=corpus_lines(inputs), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=list(SP_ROLE_MARKERS.values()),
            # Exact round trip of completions: no normalisation, no whitespace folding.
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            max_sentence_length=_MAX_LINE_BYTES, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as error:  # SentencePiece reports corpus/vocab mismatches this way
        raise ValueError(f"SentencePiece training on {list(inputs)} with vocab_size = "
                         f"{vocab_size} failed: {error}; raise vocab_size or lower "
                         f"character_coverage = {character_coverage}") from error
    path = f"{output_prefix}.model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(f"{output_prefix}.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return path


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m megatron_wmss.data.train_tokenizer") -> int:
    """CLI: train, then print ``{"model", "vocab_size", "padded_vocab_size"}`` as JSON.

    Returns 0, or 2 after printing a bad input as one line ``{prog}: error: ...``."""
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True,
                        help="text, JSONL or JSON corpus file (repeat for several)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000, help="upper bound, pieces")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="fraction of corpus characters given pieces; the rest are bytes")
    parser.add_argument("--max-sentences", type=int, default=1_000_000,
                        help="lines sampled from the corpus for training")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="only for the padded_vocab_size printed")
    args = parser.parse_args(argv)

    def body() -> None:
        import sentencepiece as spm

        path = train_sentencepiece(args.input, args.output_prefix, args.vocab_size,
                                   args.model_type, args.max_sentences, args.character_coverage)
        size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
        print(json.dumps({"model": path, "vocab_size": size, "padded_vocab_size":
                          padded_vocab_size(size, args.tensor_parallel_size)}))

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
