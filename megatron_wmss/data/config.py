"""Configuration of the supervised data pipeline: where the data is, how it is tokenized, batched.

YAML recipes fill these dataclasses; every default lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOSS_SPANS",
    "OVERLENGTH_POLICIES",
    "SCHEMAS",
    "TOKENIZER_KINDS",
    "DataConfig",
    "TokenizerConfig",
]

#: Row layouts accepted in data files; "auto" picks the first whose fields are all present.
SCHEMAS = ("auto", "chat", "prompt_completion", "question_answer", "instruction_output")
#: What to do with a sample longer than ``max_length`` tokens.
OVERLENGTH_POLICIES = ("truncate", "drop")
#: data.loss_on: the supervised span of SFT and joint training.
LOSS_SPANS = ("completion", "all")
#: Tokenizer back ends; "auto" means a file is a SentencePiece model, a directory an HF tokenizer.
TOKENIZER_KINDS = ("auto", "hf", "sentencepiece")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name} = {value!r} is invalid; allowed: {allowed}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `micro_batch_size: true` in YAML is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an int >= {minimum}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, " | ".join(choices))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "true | false")


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        _fail(name, value, "null or a non-empty string")


@dataclass
class TokenizerConfig:
    """Which tokenizer to load and how far to trust it."""

    path: str
    """Local HF tokenizer directory, SentencePiece ``.model`` file, or HF hub name (online only)."""
    kind: str = "auto"
    """auto | hf | sentencepiece; auto: a file is SentencePiece, anything else HF."""
    trust_remote_code: bool = False
    """Run Python code shipped with an HF tokenizer; off unless the user asks for it."""
    chat_template: str | None = None
    """Path to a Jinja file replacing the HF tokenizer's chat template (base models lack one)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            _fail("tokenizer.path", self.path, "a non-empty string")
        _check_choice("tokenizer.kind", self.kind, TOKENIZER_KINDS)
        _check_bool("tokenizer.trust_remote_code", self.trust_remote_code)
        _check_optional_str("tokenizer.chat_template", self.chat_template)
        if self.chat_template is not None and self.kind == "sentencepiece":
            _fail("tokenizer.chat_template", self.chat_template,
                  "null for SentencePiece models (they use the built-in template)")


@dataclass
class DataConfig:
    """Supervised (SFT) data shared by all three WMSS phases."""

    paths: list[str]
    """Data files (.jsonl/.json, optionally .gz, or .parquet), directories of them, or hub
    dataset names."""
    split: str = "train"
    """Split to read from a hub dataset (local files are always one split)."""
    subset: str | None = None
    """Configuration (subset) of a hub dataset; null: its default."""
    schema: str = "auto"
    """Row layout: auto | chat | prompt_completion | question_answer | instruction_output."""
    max_length: int = 4096
    """Most tokens per sample (prompt + completion + EOS), tokens."""
    overlength: str = "truncate"
    """truncate: keep the first max_length tokens; drop: skip the sample. Both are counted."""
    strict: bool = False
    """Raise instead of skipping (and counting) samples whose completion is empty."""
    num_proc: int = 1
    """Processes for tokenization (``datasets.map``); 1 tokenizes in this process."""
    cache_dir: str | None = None
    """Where ``datasets`` caches loaded and tokenized tables; null: the HF datasets default."""
    seed: int = 1234
    """Seed of the per-epoch shuffle; epoch e uses the permutation drawn from (seed, e)."""
    shuffle: bool = True
    """Shuffle each epoch; false keeps file order (entropy pass, debugging)."""
    micro_batch_size: int = 1
    """Samples per micro-batch on one data-parallel rank."""
    pad_to_multiple_of: int = 8
    """Pad each micro-batch to the longest sample rounded up to this multiple, tokens."""
    pad_to_max_length: bool = False
    """Pad every micro-batch to max_length (rounded as above): pipeline parallelism without
    variable sequence lengths needs one shape."""
    active_set: str | None = None
    """JSON/JSONL file of sample idx, duplicates allowed (the curriculum's D_active); null: all."""
    loss_on: str = "completion"
    """Which tokens carry the loss: completion (the assistant replies, each closed by EOS; the
    paper's) or all (every token of the conversation exactly as the chat template renders it,
    nothing appended: what the authors' TRL SFTTrainer trains on a ``messages`` dataset)."""
    pack_sequences: bool = False
    """Pack several samples per row of ``max_length`` (rounded up to pad_to_multiple_of)
    tokens, attention confined to each sample, positions restarting per sample; then
    micro_batch_size and the global batch count packed rows, not samples."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if (not isinstance(self.paths, (list, tuple)) or not self.paths
                or not all(isinstance(p, str) and p for p in self.paths)):
            _fail("data.paths", self.paths, "a non-empty list of file, directory or hub names")
        self.paths = list(self.paths)
        if not isinstance(self.split, str) or not self.split:
            _fail("data.split", self.split, "a non-empty string such as 'train'")
        _check_optional_str("data.subset", self.subset)
        _check_choice("data.schema", self.schema, SCHEMAS)
        # Two tokens is the least that holds one prediction (position 0 predicts token 1).
        _check_int("data.max_length", self.max_length, 2)
        _check_choice("data.overlength", self.overlength, OVERLENGTH_POLICIES)
        _check_bool("data.strict", self.strict)
        _check_int("data.num_proc", self.num_proc, 1)
        _check_optional_str("data.cache_dir", self.cache_dir)
        _check_int("data.seed", self.seed, 0)
        _check_bool("data.shuffle", self.shuffle)
        _check_int("data.micro_batch_size", self.micro_batch_size, 1)
        _check_int("data.pad_to_multiple_of", self.pad_to_multiple_of, 1)
        _check_bool("data.pad_to_max_length", self.pad_to_max_length)
        _check_optional_str("data.active_set", self.active_set)
        _check_choice("data.loss_on", self.loss_on, LOSS_SPANS)
        _check_bool("data.pack_sequences", self.pack_sequences)

    @property
    def row_length(self) -> int:
        """``max_length`` rounded up to ``pad_to_multiple_of``: the longest row, tokens."""
        return -(-self.max_length // self.pad_to_multiple_of) * self.pad_to_multiple_of

    @property
    def padded_length(self) -> int | None:
        """Fixed row length when ``pad_to_max_length`` or ``pack_sequences``, else None (pad to
        the longest sample of each micro-batch), tokens."""
        if not (self.pad_to_max_length or self.pack_sequences):
            return None
        return self.row_length
