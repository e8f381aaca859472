"""Tokenization of supervised data through the tokenizer's chat template, cached and parallel.

Each input table is mapped once (``datasets.map``, ``num_proc`` workers) to rows of
``idx, input_ids [L] int32, assistant_mask [L] bool, answer_start, num_tokens, num_targets,
status`` (``assistant_mask``: the supervised tokens, per ``data.loss_on``; ``answer_start``: the
first token after the conversation up to its first reply rendered without the generation
prompt, i.e. where the authors' entropy span begins, header included).
The map output is cached by ``datasets`` under a fingerprint of the input table, the tokenizer
and the settings that decide the ids, so phases 1-3 tokenize once. Rows that cannot be used keep
their idx and a status, so the summary is recomputed from the table, cached or not, and nothing
disappears without being counted.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_wmss.data.config import DataConfig
from megatron_wmss.data.schemas import (
    DataFormatError,
    has_completion,
    row_to_messages,
    schema_columns,
)
from megatron_wmss.data.sources import Source, load_sources
from megatron_wmss.data.tokenizers import ChatTokenizer

if TYPE_CHECKING:
    import datasets

__all__ = ["Status", "TokenizeSummary", "TokenizedSFT", "tokenize_sft"]

logger = logging.getLogger(__name__)

# Part of the cache key: bump when the row layout or the rules below change.
_ROW_FORMAT_VERSION = "wmss-sft-rows-2"
_MAP_BATCH_SIZE = 256


class Status(enum.IntEnum):
    """Fate of one input row."""

    KEPT = 0
    TRUNCATED = 1  # kept, cut to max_length tokens
    DROPPED_OVERLENGTH = 2  # longer than max_length under overlength = "drop"
    DROPPED_PROMPT_TOO_LONG = 3  # truncation left no completion token to learn
    SKIPPED_EMPTY = 4  # the completion is empty or whitespace


@dataclass(frozen=True)
class TokenizeSummary:
    """Counts of one tokenization; kept includes truncated rows."""

    total: int
    kept: int
    truncated: int
    dropped_overlength: int
    dropped_prompt_too_long: int
    skipped_empty: int
    tokens: int  # tokens in kept rows
    target_tokens: int  # supervised next-token targets in kept rows

    @classmethod
    def from_columns(cls, status: np.ndarray, num_tokens: np.ndarray,
                     num_targets: np.ndarray) -> TokenizeSummary:
        counts = np.bincount(status, minlength=len(Status))
        kept = status <= Status.TRUNCATED
        return cls(total=int(status.size), kept=int(kept.sum()),
                   truncated=int(counts[Status.TRUNCATED]),
                   dropped_overlength=int(counts[Status.DROPPED_OVERLENGTH]),
                   dropped_prompt_too_long=int(counts[Status.DROPPED_PROMPT_TOO_LONG]),
                   skipped_empty=int(counts[Status.SKIPPED_EMPTY]),
                   tokens=int(num_tokens[kept].sum()), target_tokens=int(num_targets[kept].sum()))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in asdict(self).items())


class _TokenizeRows:
    """The ``datasets.map`` function for one source (batched, with row indices)."""

    def __init__(self, tokenizer: ChatTokenizer, source: Source, max_length: int,
                 overlength: str, loss_on: str = "completion") -> None:
        self.tokenizer = tokenizer
        self.schema = source.schema
        self.name = source.name
        self.first_row = source.first_row
        self.has_idx = "idx" in source.table.column_names
        self.columns = schema_columns(source.schema, source.table.column_names)
        self.max_length = max_length
        self.drop_overlength = overlength == "drop"
        self.supervise_all = loss_on == "all"

    def __call__(self, batch: dict[str, list], rows: list[int]) -> dict[str, list]:
        idx = batch["idx"] if self.has_idx else [self.first_row + r for r in rows]
        conversations = []
        for j, row in enumerate(rows):
            fields = {c: batch[c][j] for c in self.columns}
            messages = row_to_messages(self.schema, fields, f"{self.name} row {row} (idx {idx[j]})")
            conversations.append(messages if has_completion(messages) else None)
        kept = [c for c in conversations if c]
        encoded = iter(self.tokenizer.encode_chat_batch(kept, supervise_all=self.supervise_all))
        # The prompt before the first reply, without the generation prompt, encoded alone: its
        # length is where the authors' entropy span starts (curriculum entropy positions).
        prompts = iter(_prompt_lengths(self.tokenizer, kept))
        out: dict[str, list] = {"idx": idx, "input_ids": [], "assistant_mask": [],
                                "answer_start": [], "num_tokens": [], "num_targets": [],
                                "status": []}
        for conversation in conversations:
            ids: list[int] = []
            mask: list[bool] = []
            status = Status.SKIPPED_EMPTY
            answer_start = 0
            if conversation is not None:
                ids, mask = next(encoded)
                answer_start = next(prompts)
                status = Status.KEPT
                if len(ids) > self.max_length:
                    status = Status.DROPPED_OVERLENGTH if self.drop_overlength else Status.TRUNCATED
                    ids, mask = ids[: self.max_length], mask[: self.max_length]
                # Position 0 is never a target: nothing before it predicts it.
                if status != Status.DROPPED_OVERLENGTH and not any(mask[1:]):
                    status = Status.DROPPED_PROMPT_TOO_LONG
                if status > Status.TRUNCATED:
                    ids, mask = [], []
            out["input_ids"].append(ids)
            out["assistant_mask"].append(mask)
            out["answer_start"].append(min(answer_start, len(ids)))
            out["num_tokens"].append(len(ids))
            out["num_targets"].append(sum(mask[1:]))
            out["status"].append(int(status))
        return out


def _prompt_lengths(tokenizer: ChatTokenizer, conversations: list[list[dict]]) -> list[int]:
    """Tokens of each conversation's turns before its first reply, rendered without the
    generation prompt and encoded alone (as the authors' entropy code measures a prompt)."""
    prefixes = [c[:next(i for i, m in enumerate(c) if m["role"] == "assistant")]
                for c in conversations]
    encoded = iter(tokenizer.encode_chat_batch([p for p in prefixes if p]))
    return [len(next(encoded)[0]) if p else 0 for p in prefixes]


def _features() -> datasets.Features:
    from datasets import Features, Sequence, Value

    return Features({"idx": Value("int64"), "input_ids": Sequence(Value("int32")),
                     "assistant_mask": Sequence(Value("bool")),
                     "answer_start": Value("int32"), "num_tokens": Value("int32"),
                     "num_targets": Value("int32"), "status": Value("int8")})


def _fingerprint(source: Source, tokenizer: ChatTokenizer, config: DataConfig) -> str:
    key = [_ROW_FORMAT_VERSION, source.table._fingerprint, source.schema, source.first_row,
           tokenizer.fingerprint, config.max_length, config.overlength, config.loss_on]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40]


@dataclass
class TokenizedSFT:
    """Tokenized supervised data: the kept rows, their idx, and what happened to the rest."""

    dataset: datasets.Dataset
    """Kept rows: idx, input_ids [L] int32, assistant_mask [L] bool, num_tokens, num_targets."""
    summary: TokenizeSummary
    idx: np.ndarray
    """[rows] int64: idx of each kept row, in row order."""
    not_kept: dict[int, str] = field(default_factory=dict)
    """idx -> status name of every row that was dropped or skipped."""

    def __len__(self) -> int:
        return len(self.dataset)

    def rows_for_idx(self, idx: Any, source: str = "idx list") -> np.ndarray:
        """[n] int64 rows holding the samples ``idx`` (duplicates kept); errors name strays."""
        wanted = np.asarray(idx, dtype=np.int64).reshape(-1)
        order = np.argsort(self.idx, kind="stable")
        sorted_idx = self.idx[order]
        pos = np.minimum(np.searchsorted(sorted_idx, wanted), max(len(sorted_idx) - 1, 0))
        found = sorted_idx[pos] == wanted if len(sorted_idx) else np.zeros(wanted.shape, bool)
        if not found.all():
            missing = np.unique(wanted[~found])
            shown = ", ".join(f"{i} ({self.not_kept.get(int(i), 'unknown idx')})"
                              for i in missing[:5])
            raise DataFormatError(f"{source}: {missing.size} idx not among the {len(self)} kept "
                                  f"samples: {shown}{' ...' if missing.size > 5 else ''}")
        return order[pos]


def _check_duplicates(idx: np.ndarray, sources: list[Source]) -> None:
    values, counts = np.unique(idx, return_counts=True)
    if (counts == 1).all():
        return
    starts = np.array([s.first_row for s in sources])
    lines = []
    for value in values[counts > 1][:5]:
        where = []
        for row in np.flatnonzero(idx == value):
            source = sources[int(np.searchsorted(starts, row, side="right")) - 1]
            where.append(f"{source.name} row {row - source.first_row}")
        lines.append(f"idx {value} at {', '.join(where)}")
    raise DataFormatError(f"{int((counts > 1).sum())} duplicate sample idx; every idx must be "
                          f"unique across all data files: " + "; ".join(lines))


def tokenize_sft(config: DataConfig, tokenizer: ChatTokenizer) -> TokenizedSFT:
    """Load ``config.paths``, tokenize with ``tokenizer``'s chat template, validate, summarise."""
    import datasets

    sources = load_sources(config.paths, config.schema, config.split, config.cache_dir,
                           config.subset)
    tables = []
    for source in sources:
        tables.append(source.table.map(
            _TokenizeRows(tokenizer, source, config.max_length, config.overlength,
                          config.loss_on),
            batched=True, batch_size=_MAP_BATCH_SIZE, with_indices=True,
            remove_columns=source.table.column_names, features=_features(),
            num_proc=config.num_proc if config.num_proc > 1 else None,
            new_fingerprint=_fingerprint(source, tokenizer, config),
            desc=f"tokenize {source.name}"))
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    columns = {c: table.data.column(c).to_numpy() for c in
               ("idx", "status", "num_tokens", "num_targets")}
    _check_duplicates(columns["idx"], sources)
    status = columns["status"].astype(np.int64)
    summary = TokenizeSummary.from_columns(status, columns["num_tokens"], columns["num_targets"])
    if config.strict and summary.skipped_empty:
        empty = columns["idx"][status == Status.SKIPPED_EMPTY]
        raise DataFormatError(
            f"{summary.skipped_empty} sample(s) have an empty completion (idx "
            f"{', '.join(map(str, empty[:5]))}{' ...' if empty.size > 5 else ''}) in "
            f"{', '.join(s.name for s in sources)}; data.strict = true forbids skipping them")
    # Anything not kept intact is a warning: the user must see it without asking.
    level = logging.INFO if summary.kept == summary.total and not summary.truncated else \
        logging.WARNING
    logger.log(level, "tokenized %s: %s", ", ".join(s.name for s in sources), summary)
    if summary.kept == 0:
        raise DataFormatError(f"no sample is left after tokenization ({summary}); check "
                              f"max_length = {config.max_length} and the completions")
    keep = status <= Status.TRUNCATED
    not_kept = {int(i): Status(s).name.lower()
                for i, s in zip(columns["idx"][~keep], status[~keep])}
    if not keep.all():
        table = table.select(np.flatnonzero(keep))
    return TokenizedSFT(dataset=table, summary=summary, idx=columns["idx"][keep],
                        not_kept=not_kept)
