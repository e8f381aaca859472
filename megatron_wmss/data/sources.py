"""Loading supervised data with ``datasets``: local JSONL / JSON / Parquet files and hub names.

Each file becomes one ``datasets.Dataset`` (cached by ``datasets`` under ``cache_dir``) with its
schema and the global row number of its first row, which is the default sample idx.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from megatron_wmss.data.schemas import DataFormatError, detect_schema

if TYPE_CHECKING:
    import datasets

__all__ = ["DATA_SUFFIXES", "Source", "iter_json_records", "load_sources", "resolve_paths"]

#: File suffixes read from disk, and the ``datasets`` builder that reads each.
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                 ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """One loaded input: a file or a hub dataset split."""

    name: str
    """File path or hub name, as errors and logs show it."""
    table: datasets.Dataset
    """Rows as read, columns untouched."""
    schema: str
    """Schema resolved for this input (never "auto")."""
    first_row: int
    """Global row number of row 0: the default idx of row i is ``first_row + i``."""


def _builder(path: str) -> str | None:
    for suffix, builder in DATA_SUFFIXES.items():
        if path.endswith(suffix):
            return builder
    return None


def _looks_local(name: str) -> bool:
    # Hub names look like "org/name"; anything path-like or with a data suffix must exist here.
    return (name.startswith(("/", "./", "../", "~")) or _builder(name) is not None
            or os.path.exists(name))


def resolve_paths(paths: list[str]) -> list[tuple[str, str | None]]:
    """``(name, builder)`` per input in order; directories expand to their sorted data files and
    builder None marks a hub dataset name."""
    resolved: list[tuple[str, str | None]] = []
    for name in paths:
        path = os.path.expanduser(name)
        if os.path.isdir(path):
            files = sorted(str(p) for p in Path(path).iterdir() if p.is_file() and _builder(p.name))
            if not files:
                raise DataFormatError(
                    f"directory {name} holds no data files; accepted suffixes: "
                    f"{', '.join(DATA_SUFFIXES)}")
            resolved.extend((f, _builder(f)) for f in files)
        elif os.path.isfile(path):
            builder = _builder(path)
            if builder is None:
                raise DataFormatError(
                    f"{name}: unknown data file suffix; accepted: {', '.join(DATA_SUFFIXES)}")
            resolved.append((path, builder))
        elif _looks_local(name):
            raise FileNotFoundError(f"data path {name} does not exist")
        else:
            resolved.append((name, None))
    return resolved


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of a JSON Lines file (1-based; blank lines skipped), or of the
    elements of a file holding one JSON array (line number 0). Errors name file and line."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
            for record in records:
                yield 0, record
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): "
                    f"{line.strip()[:80]!r}") from None


def _load_file(path: str, builder: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as error:
        if builder != "json":
            raise DataFormatError(f"{path}: cannot read as {builder}: {error}") from error
        # datasets reports a block-relative row; find the line ourselves (failure path only).
        for _ in iter_json_records(path):
            pass
        raise DataFormatError(f"{path}: cannot read as JSON Lines or a JSON array: "
                              f"{error.__cause__ or error}") from error


def _check_idx_column(table: datasets.Dataset, name: str) -> None:
    import datasets

    feature = table.features["idx"]
    if not isinstance(feature, datasets.Value) or not feature.dtype.startswith(("int", "uint")):
        raise DataFormatError(f"{name}: column 'idx' has type {feature}; expected integers")
    nulls = table.data.column("idx").null_count
    if nulls:
        raise DataFormatError(
            f"{name}: column 'idx' is missing in {nulls} row(s); give every row an integer idx "
            f"or drop the column to use row numbers")


def load_sources(paths: list[str], schema: str, split: str = "train",
                 cache_dir: str | None = None, subset: str | None = None) -> list[Source]:
    """Load every input of ``paths`` and resolve its schema (``schema`` or "auto");
    ``split`` and ``subset`` (configuration name) apply to hub datasets."""
    import datasets

    sources = []
    first_row = 0
    for name, builder in resolve_paths(paths):
        if builder is None:
            try:
                table = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
            except Exception as error:
                raise DataFormatError(
                    f"{name} is not a local file or directory, and loading it as a hub dataset "
                    f"(subset {subset!r}, split {split!r}) failed: {error}") from error
        else:
            table = _load_file(name, builder, cache_dir)
        if "idx" in table.column_names:
            _check_idx_column(table, name)
        resolved = detect_schema(table.column_names, schema, name)
        sources.append(Source(name=name, table=table, schema=resolved, first_row=first_row))
        first_row += len(table)
    return sources
