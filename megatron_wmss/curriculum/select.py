"""WD-DS selection: entropy files of the weak and strong model -> the phase-3 active set.

Reads the two per-sample entropy files written by the entropy pass, checks that they describe
the same samples (same data fingerprint and vocabulary size when their sidecars say, the same
idx set), computes the sampling weights (:mod:`megatron_wmss.curriculum.weights`), draws
``num_samples`` idx with replacement from them (seeded), optionally de-duplicates, and
publishes a directory with three files:

- ``active_set.jsonl``: one ``{"idx", "multiplicity", "draws", "weight"}`` per kept sample,
  sorted by idx, read by :func:`megatron_wmss.data.read_active_set` (``data.active_set``);
- ``summary.json``: the settings, counts, ΔH signs and the top / bottom samples by weight;
- ``weights.png``: histograms of the weights and of ΔH.

Entropy file: JSON Lines (or a JSON array) of ``{"idx": int, "entropy": float,
"num_tokens": int}``, or Parquet with those columns; ``num_tokens`` is optional. A sidecar
``<file>.meta.json`` (``{"model", "data_fingerprint", "vocab_size"}``) is optional.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from megatron_wmss.curriculum.weights import (
    FORMULAS,
    ZeroWeightsError,
    check_coefficients,
    discrepancy_scores,
    normalize_scores,
)
from megatron_wmss.data.schemas import DataFormatError
from megatron_wmss.data.sources import iter_json_records
from megatron_wmss.platform.files import check_output_dir, publishing_directory

__all__ = ["ACTIVE_SET_FILE", "ON_MISSING", "FALLBACKS", "SUMMARY_FILE", "WEIGHTS_PNG",
           "AlignedEntropies", "EntropyTable", "Selection", "SelectionConfig",
           "align_entropies", "check_compatible", "read_entropies", "run_select",
           "select_active_set", "summarize", "write_selection"]

ACTIVE_SET_FILE, SUMMARY_FILE, WEIGHTS_PNG = "active_set.jsonl", "summary.json", "weights.png"
ON_MISSING = ("error", "drop")
FALLBACKS = ("error", "uniform")
_EXAMPLES = 5    # idx shown in an error message
_EXTREMES = 10   # samples listed at each end of summary.json's ranking


@dataclass(frozen=True)
class SelectionConfig:
    """How ``wmss select`` turns entropies into an active set; defaults are paper v2's."""

    formula: str = "paper"
    """Weight formula: "paper" (v2 Eq. 9) or "reference" (the authors' code)."""
    alpha: float = 0.1
    """Weight of [−ΔH]₊ (paper) / of H_weak (reference); >= 0."""
    beta: float = 0.8
    """Weight of H_strong (paper) / of [−ΔH]₊ (reference); >= 0."""
    gamma: float = 0.1
    """Weight of [ΔH]₊ (both formulas); >= 0. Not all of alpha, beta, gamma may be 0."""
    num_samples: int | None = None
    """Draws with replacement; None: one per sample with both entropies (|D|)."""
    seed: int = 0
    """Seed of ``numpy.random.default_rng`` for the draws; >= 0."""
    dedupe: bool = True
    """Keep each drawn sample once (paper v2); False: as often as drawn (reference code)."""
    on_missing: str = "error"
    """idx in only one entropy file: "error", or "drop" them and use the common ones."""
    fallback: str = "error"
    """All weights 0: "error", or "uniform" sampling (recorded in summary.json)."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("formula", self.formula, FORMULAS),
                                     ("on_missing", self.on_missing, ON_MISSING),
                                     ("fallback", self.fallback, FALLBACKS)):
            if value not in allowed:
                raise ValueError(f"{name} = {value!r} is invalid; allowed: {', '.join(allowed)}")
        check_coefficients(self.alpha, self.beta, self.gamma)
        for name, value, low, optional in (("num_samples", self.num_samples, 1, True),
                                           ("seed", self.seed, 0, False)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} = {value!r} is invalid; allowed: an int >= {low}"
                                 f"{' or null (one draw per sample)' if optional else ''}")
        if not isinstance(self.dedupe, bool):
            raise ValueError(f"dedupe = {self.dedupe!r} is invalid; allowed: true or false")


@dataclass(frozen=True)
class EntropyTable:
    """One model's per-sample entropies, as read from ``path``."""

    path: str
    idx: np.ndarray       # [n] int64, file order
    entropy: np.ndarray   # [n] float64, nats per supervised token
    lines: np.ndarray     # [n] int64 line (JSONL, 0 in a JSON array) or row (Parquet) of each
    meta: dict | None     # the sidecar <path>.meta.json, None when there is none

    def where(self, k: int) -> str:
        """Where entry ``k`` is, for error messages: ``file:line`` or ``file row r``."""
        line = int(self.lines[k])
        if self.path.endswith(".parquet"):
            return f"{self.path} row {line}"
        return f"{self.path}:{line}" if line else f"{self.path} entry {k}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _read_jsonl(path: str) -> tuple[list, list, list]:
    idx, entropy, lines = [], [], []
    for lineno, record in iter_json_records(path):
        where = f"{path}:{lineno}" if lineno else path
        if not isinstance(record, dict) or not _is_int(record.get("idx")):
            raise DataFormatError(f"{where}: entropy record {record!r:.80} lacks an integer "
                                  f"\"idx\"; accepted: {{\"idx\": int, \"entropy\": float, "
                                  f"\"num_tokens\": int}}")
        value = record.get("entropy")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataFormatError(f"{where}: idx {record['idx']} has entropy {value!r:.40}; "
                                  f"accepted: a finite number >= 0")
        tokens = record.get("num_tokens", 0)
        if not _is_int(tokens) or tokens < 0:
            raise DataFormatError(f"{where}: idx {record['idx']} has num_tokens "
                                  f"{tokens!r:.40}; accepted: an int >= 0")
        idx.append(record["idx"])
        entropy.append(float(value))
        lines.append(lineno)
    return idx, entropy, lines


def _read_parquet(path: str) -> tuple[Any, Any, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataFormatError(f"{path}: cannot read as Parquet: {err}") from err
    columns = {}
    for name, check, kind in (("idx", pa.types.is_integer, "integer"),
                              ("entropy", lambda t: pa.types.is_floating(t)
                               or pa.types.is_integer(t), "number"),
                              ("num_tokens", pa.types.is_integer, "integer")):
        if name not in table.column_names:
            if name == "num_tokens":
                continue
            raise DataFormatError(f"{path}: no column {name!r} (columns: "
                                  f"{', '.join(table.column_names)}); accepted: idx (integer), "
                                  f"entropy (number), num_tokens (integer, optional)")
        column = table.column(name)
        if not check(column.type):
            raise DataFormatError(f"{path}: column {name!r} has type {column.type}; accepted: "
                                  f"{kind}")
        if column.null_count:
            raise DataFormatError(f"{path}: column {name!r} holds {column.null_count} nulls; "
                                  "every sample needs a value")
        columns[name] = column.to_numpy()
    negative = np.flatnonzero(columns.get("num_tokens", np.zeros(0)) < 0)
    if negative.size:
        k = int(negative[0])
        raise DataFormatError(f"{path} row {k}: idx {columns['idx'][k]} has num_tokens "
                              f"{columns['num_tokens'][k]}; accepted: an int >= 0")
    return columns["idx"], columns["entropy"], np.arange(table.num_rows)


def _read_meta(path: str) -> dict | None:
    sidecar = f"{path}.meta.json"
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{sidecar}:{err.lineno}: malformed JSON: {err.msg}") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"{sidecar}: holds {type(meta).__name__}; accepted: an object "
                              "{\"model\", \"data_fingerprint\", \"vocab_size\"}")
    return meta


def read_entropies(path: str | os.PathLike) -> EntropyTable:
    """Read and check one entropy file (format: see the module doc) and its sidecar.

    Errors (ValueError / FileNotFoundError) name the file and line or row: a missing file, a
    malformed line, a NaN / infinite / negative entropy, a negative num_tokens, a duplicate idx.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"entropy file {path} does not exist")
    reader = _read_parquet if path.endswith(".parquet") else _read_jsonl
    idx, entropy, lines = reader(path)
    table = EntropyTable(path, np.asarray(idx, dtype=np.int64).reshape(-1),
                         np.asarray(entropy, dtype=np.float64).reshape(-1),
                         np.asarray(lines, dtype=np.int64).reshape(-1), _read_meta(path))
    if table.idx.size == 0:
        raise DataFormatError(f"entropy file {path} lists no samples")
    bad = np.flatnonzero(~np.isfinite(table.entropy) | (table.entropy < 0))
    if bad.size:
        k = int(bad[0])
        raise DataFormatError(f"{table.where(k)}: idx {table.idx[k]} has entropy "
                              f"{float(table.entropy[k])!r} ({bad.size} such samples in the file); "
                              f"accepted: a finite number >= 0")
    values, counts = np.unique(table.idx, return_counts=True)
    if (counts > 1).any():
        repeated = values[counts > 1]
        shown = "; ".join(f"idx {i} at " + ", ".join(table.where(int(k)) for k in
                                                      np.flatnonzero(table.idx == i)[:3])
                          for i in repeated[:_EXAMPLES])
        raise DataFormatError(f"{path}: {repeated.size} idx occur more than once ({shown}"
                              f"{' ...' if repeated.size > _EXAMPLES else ''}); each sample "
                              f"needs exactly one entropy")
    return table


def check_compatible(weak: EntropyTable, strong: EntropyTable) -> None:
    """Refuse two entropy files whose sidecars disagree on the data or the vocabulary."""
    if weak.meta is None or strong.meta is None:
        return
    a, b = weak.meta.get("data_fingerprint"), strong.meta.get("data_fingerprint")
    if a is not None and b is not None and a != b:
        raise ValueError(f"{weak.path} and {strong.path} are entropies of different data: "
                         f"data_fingerprint {a!r} vs {b!r} (their .meta.json); compute both on "
                         "the same training set")
    a, b = weak.meta.get("positions", "next-token"), strong.meta.get("positions", "next-token")
    if a != b:
        raise ValueError(f"{weak.path} and {strong.path} average entropies over different "
                         f"positions: {a!r} vs {b!r} (their .meta.json); compute both with the "
                         "same wmss entropy --positions")
    a, b = weak.meta.get("vocab_size"), strong.meta.get("vocab_size")
    if a is not None and b is not None and a != b:
        raise ValueError(f"{weak.path} and {strong.path} come from models with different "
                         f"vocabularies: vocab_size {a!r} vs {b!r} (their .meta.json); the weak "
                         "and the strong model must share one tokenizer")


@dataclass(frozen=True)
class AlignedEntropies:
    """Both models' entropies on the samples the two files have in common."""

    idx: np.ndarray          # [n] int64, sorted
    h_weak: np.ndarray       # [n] float64
    h_strong: np.ndarray     # [n] float64
    weak_only: np.ndarray    # idx only in the weak file (dropped)
    strong_only: np.ndarray  # idx only in the strong file (dropped)


def _examples(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:_EXAMPLES].tolist())
    return shown + (", ..." if values.size > _EXAMPLES else "")


def _lookup(table: EntropyTable, idx: np.ndarray) -> np.ndarray:
    order = np.argsort(table.idx, kind="stable")
    return table.entropy[order[np.searchsorted(table.idx[order], idx)]]


def align_entropies(weak: EntropyTable, strong: EntropyTable,
                    on_missing: str = "error") -> AlignedEntropies:
    """Pair the two files by idx; idx in only one of them are an error unless ``on_missing``
    is "drop"."""
    common = np.intersect1d(weak.idx, strong.idx)
    weak_only = np.setdiff1d(weak.idx, strong.idx)
    strong_only = np.setdiff1d(strong.idx, weak.idx)
    if (weak_only.size or strong_only.size) and on_missing != "drop":
        raise ValueError(
            f"{weak.path} and {strong.path} cover different samples: {weak_only.size} idx only "
            f"in {weak.path} ({_examples(weak_only) or 'none'}) and {strong_only.size} only in "
            f"{strong.path} ({_examples(strong_only) or 'none'}); compute both on the same "
            f"data, or pass --on-missing drop to use the {common.size} common ones")
    if common.size == 0:
        raise ValueError(f"{weak.path} and {strong.path} have no idx in common")
    return AlignedEntropies(common, _lookup(weak, common), _lookup(strong, common),
                            weak_only, strong_only)


@dataclass(frozen=True)
class Selection:
    """The drawn active set over the aligned samples."""

    config: SelectionConfig
    idx: np.ndarray       # [n] int64, sorted
    h_weak: np.ndarray    # [n] float64
    h_strong: np.ndarray  # [n] float64
    weights: np.ndarray   # [n] float64 sampling probabilities p, sum 1
    draws: np.ndarray     # [n] int64 times each sample was drawn
    fallback_used: bool   # all weights were 0 and p is uniform

    @property
    def delta(self) -> np.ndarray:
        """[n] ΔH = H_strong − H_weak."""
        return self.h_strong - self.h_weak

    @property
    def kept(self) -> np.ndarray:
        """[n] bool: drawn at least once."""
        return self.draws > 0

    @property
    def multiplicity(self) -> np.ndarray:
        """[n] times each sample occurs in the active set (1 or 0 with dedupe, else draws)."""
        return self.kept.astype(np.int64) if self.config.dedupe else self.draws

    def records(self) -> list[dict]:
        """The active_set.jsonl objects, one per kept sample, sorted by idx."""
        mult = self.multiplicity
        return [{"idx": int(self.idx[k]), "multiplicity": int(mult[k]),
                 "draws": int(self.draws[k]), "weight": float(self.weights[k])}
                for k in np.flatnonzero(self.kept)]


def select_active_set(aligned: AlignedEntropies, config: SelectionConfig) -> Selection:
    """Weights of ``config.formula``, then ``num_samples`` seeded draws with replacement."""
    n = aligned.idx.size
    scores = discrepancy_scores(aligned.h_weak, aligned.h_strong, formula=config.formula,
                                alpha=config.alpha, beta=config.beta, gamma=config.gamma)
    fallback_used = False
    try:
        weights = normalize_scores(scores)
    except ZeroWeightsError:
        if config.fallback != "uniform":
            raise ZeroWeightsError(
                f"all {n} sampling weights are zero (formula {config.formula}, alpha "
                f"{config.alpha}, beta {config.beta}, gamma {config.gamma}; the largest weak / "
                f"strong entropy is {aligned.h_weak.max():g} / {aligned.h_strong.max():g}); "
                "check the entropy files, or pass --fallback uniform to sample uniformly"
            ) from None
        weights, fallback_used = np.full(n, 1.0 / n), True
    num_samples = n if config.num_samples is None else int(config.num_samples)
    picks = np.random.default_rng(config.seed).choice(n, size=num_samples, replace=True,
                                                      p=weights)
    return Selection(config, aligned.idx, aligned.h_weak, aligned.h_strong, weights,
                     np.bincount(picks, minlength=n).astype(np.int64), fallback_used)


def _row(selection: Selection, k: int) -> dict:
    return {"idx": int(selection.idx[k]), "weight": float(selection.weights[k]),
            "h_weak": float(selection.h_weak[k]), "h_strong": float(selection.h_strong[k]),
            "delta_h": float(selection.delta[k]), "draws": int(selection.draws[k])}


def summarize(selection: Selection, weak: EntropyTable, strong: EntropyTable,
              aligned: AlignedEntropies) -> dict:
    """The summary.json document: settings, counts, ΔH signs, top / bottom samples by weight."""
    config, n = selection.config, selection.idx.size
    delta, unique = selection.delta, int(selection.kept.sum())
    # By weight, ties by idx, so the lists are the same on every machine.
    top = np.lexsort((selection.idx, -selection.weights))[:_EXTREMES]
    bottom = np.lexsort((selection.idx, selection.weights))[:_EXTREMES]
    return {
        **asdict(config),
        "num_samples": int(selection.draws.sum()),
        "fallback_used": selection.fallback_used,
        "inputs": {"weak": {"path": weak.path, "meta": weak.meta},
                   "strong": {"path": strong.path, "meta": strong.meta}},
        "counts": {"weak": int(weak.idx.size), "strong": int(strong.idx.size), "common": n,
                   "dropped_missing": int(aligned.weak_only.size + aligned.strong_only.size),
                   "weak_only": int(aligned.weak_only.size),
                   "strong_only": int(aligned.strong_only.size)},
        "unique_kept": unique,
        "total_draws": int(selection.draws.sum()),
        "active_set_size": int(selection.multiplicity.sum()),
        "fraction_kept": unique / n,
        "delta_h": {"negative": int((delta < 0).sum()), "zero": int((delta == 0).sum()),
                    "positive": int((delta > 0).sum()), "mean": float(delta.mean()),
                    "min": float(delta.min()), "max": float(delta.max())},
        "mean_entropy": {"weak": float(selection.h_weak.mean()),
                         "strong": float(selection.h_strong.mean())},
        "top": [_row(selection, int(k)) for k in top],
        "bottom": [_row(selection, int(k)) for k in bottom],
    }


def _json_safe(value: Any) -> Any:
    """Sidecar values may be anything JSON reads, NaN included; summary.json stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_selection(out: str | os.PathLike, selection: Selection, summary: dict,
                    overwrite: bool = False) -> None:
    """Publish ``out`` (atomically; an existing one only with ``overwrite``) with the three
    files of the module doc."""
    from megatron_wmss.curriculum.figures import write_selection_png

    with publishing_directory(out, overwrite, tag="select") as tmp:
        with open(tmp / ACTIVE_SET_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in selection.records())
        with open(tmp / SUMMARY_FILE, "w", encoding="utf-8") as f:
            json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
        write_selection_png(tmp / WEIGHTS_PNG, selection.weights, selection.delta,
                            formula=selection.config.formula)


def run_select(weak_path: str | os.PathLike, strong_path: str | os.PathLike,
               out: str | os.PathLike, config: SelectionConfig = SelectionConfig(),
               overwrite: bool = False) -> dict:
    """The whole of ``wmss select``: read, check, weigh, draw, publish; returns the summary."""
    check_output_dir(out, overwrite)  # before reading: a refused output fails at once
    weak, strong = read_entropies(weak_path), read_entropies(strong_path)
    check_compatible(weak, strong)
    aligned = align_entropies(weak, strong, config.on_missing)
    selection = select_active_set(aligned, config)
    summary = summarize(selection, weak, strong, aligned)
    write_selection(out, selection, summary, overwrite)
    return summary
