"""What a resumed run must share with the run that wrote its checkpoint, and the check.

The key is saved as ``recipe`` in every checkpoint's train_state.json and compared field by
field when a rerun finds a checkpoint:

    command                    sft | joint
    tokenizer.fingerprint      the tokenizer's vocabulary (model file) and chat template
    data.schema, max_length, overlength, loss_on, pack_sequences, pad_to_multiple_of, seed,
                               shuffle
    data.items_per_epoch       samples (packed rows with pack_sequences) the sampler visits
    data.samples_sha256        the tokenized samples (ids, masks, idx, fate of every row) and
                               the active set's rows
    model.*                    architecture, params_dtype, dropout
    optim.*, mix.*, loss.*     the objective and the optimizer
    trainer.*                  epochs, train_steps, global batch size, seed, total steps

A changed field is refused in one line naming it (the sampler's position, consumed samples,
means nothing under another data stream). The layout (parallel sizes, memory settings, micro-
batch size, pad_to_max_length), logging and checkpoint cadence may change; so may the paths of
data and tokenizer files whose contents stayed the same.

Dataset identity is a hash of the tokenized table rather than of the input files: it covers
exactly what training reads (so also hub datasets, the tokenization rules and the chat
template), it ignores what does not change the stream (moved or re-serialised files), and it
costs about what hashing the input files would: both are sha256-bound, ~5 bytes per token
here against ~4 bytes of JSON text per token there (:func:`samples_sha256`).

A checkpoint written before a field joined the key is accepted; the trainer warns with the
fields it could not check (a refusal would strand every run in progress at the upgrade, with
no way to override it). Dropout, always off until it joined the key, is compared with 0.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_wmss.config.recipe import RecipeError, to_plain

__all__ = ["check_resume_key", "resume_key", "samples_sha256"]

# Computed once per process per tokenized table (datasets' fingerprint names its content).
_TABLE_DIGESTS: dict[str, str] = {}
_COLUMNS = ("idx", "status", "input_ids", "assistant_mask")
# Fields added to the key later whose value was fixed before (no dropout until then).
_LEGACY_VALUES = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
# Digests are shown shortened in messages; 12 hex digits tell two of them apart.
_SHOWN_HEX = 12


def _bool_values(array) -> np.ndarray:
    """[n] uint8 0/1 of a pyarrow BooleanArray, unpacked from its bitmap (~10x faster than
    ``to_numpy``)."""
    if array.null_count:
        array = array.fill_null(False)
    first, n = array.offset, len(array)
    bitmap = np.frombuffer(array.buffers()[1], np.uint8)[first // 8:(first + n + 7) // 8]
    return np.unpackbits(bitmap, bitorder="little")[first % 8:first % 8 + n]


def _table_sha256(table) -> str:
    """sha256 of ``_COLUMNS`` of an Arrow table, independent of how it is chunked (the cache
    of a ``num_proc`` tokenization is chunked differently): each column's values, and a list
    column's lengths, are one stream each, whatever the chunk boundaries."""
    import pyarrow as pa

    streams: dict[str, Any] = {}

    def feed(name: str, values: np.ndarray) -> None:
        streams.setdefault(name, hashlib.sha256()).update(np.ascontiguousarray(values))

    for name in _COLUMNS:
        for chunk in table.column(name).chunks:
            if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                feed(f"{name}.lengths", chunk.value_lengths().to_numpy().astype(np.int64))
                chunk = chunk.flatten()
            if pa.types.is_boolean(chunk.type):
                feed(name, _bool_values(chunk))
            else:
                feed(name, chunk.to_numpy(zero_copy_only=False))
    combined = hashlib.sha256()
    for name in sorted(streams):
        combined.update(f"{name}:{streams[name].hexdigest()};".encode())
    return combined.hexdigest()


def samples_sha256(data, config) -> str:
    """sha256 of what one epoch draws from: every tokenized row (idx, status, input_ids,
    assistant_mask, in table order; the kept rows follow from the status) and, with
    ``config.active_set``, the rows it lists in order.

    Cost: one sha256 pass over ~5 bytes per token (int32 id, mask bit unpacked to a byte),
    on one rank, once per process and table. Measured on the project's 2-core CPU machine
    (SHA extensions; busy): 0.9 s for 250M tokens (1 GB of ids, memory-mapped cache), the
    same as sha256 of a 1 GB file read in 8 MiB chunks (0.85 s).
    """
    from megatron_wmss.data.collate import loader_rows

    table = data.dataset.data  # the backing Arrow table (dropped rows included, with status)
    cache_key = getattr(data.dataset, "_fingerprint", None)
    table_digest = _TABLE_DIGESTS.get(cache_key) if cache_key else None
    if table_digest is None:
        table_digest = _table_sha256(table)
        if cache_key:
            _TABLE_DIGESTS[cache_key] = table_digest
    digest = hashlib.sha256(table_digest.encode())
    rows = loader_rows(data, config)
    digest.update(np.ascontiguousarray(np.asarray(rows, dtype=np.int64)).tobytes()
                  if not isinstance(rows, int) else str(rows).encode())
    return digest.hexdigest()


def _shared_samples_sha256(data, config, group=None) -> str:
    """:func:`samples_sha256` computed on rank 0 of ``group`` and sent to the others (every
    rank holds the same table; one pass is enough)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return samples_sha256(data, config)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    box = [samples_sha256(data, config) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def resume_key(recipe, tokenizer, data, data_cfg, *, items_per_epoch: int, total_steps: int,
               group=None) -> dict:
    """The key of this run (JSON-ready). Collective over ``group`` (default: all ranks):
    rank 0 hashes the tokenized samples."""
    from megatron_wmss.config import ARCHITECTURE_FIELDS

    # The vocabulary padding multiple follows the layout: a checkpoint keeps its own rows.
    model_fields = [name for name in ARCHITECTURE_FIELDS
                    if name != "make_vocab_size_divisible_by"]
    model_fields += ["params_dtype", "hidden_dropout", "attention_dropout"]
    key = {
        "command": recipe.command,
        # Before the data and the model: a new tokenizer changes both, and is the cause to name.
        "tokenizer": {"fingerprint": tokenizer.fingerprint},
        "data": {"schema": data_cfg.schema, "max_length": data_cfg.max_length,
                 "overlength": data_cfg.overlength, "loss_on": data_cfg.loss_on,
                 "pack_sequences": data_cfg.pack_sequences,
                 "pad_to_multiple_of": data_cfg.pad_to_multiple_of, "seed": data_cfg.seed,
                 "shuffle": data_cfg.shuffle, "items_per_epoch": int(items_per_epoch),
                 "samples_sha256": _shared_samples_sha256(data, data_cfg, group)},
        "model": {name: getattr(recipe.model, name) for name in model_fields},
        "optim": to_plain(recipe.optim),
        "mix": to_plain(recipe.mix),
        "loss": None if recipe.joint else to_plain(recipe.loss),
        "trainer": {"epochs": recipe.trainer.epochs, "train_steps": recipe.trainer.train_steps,
                    "global_batch_size": recipe.trainer.global_batch_size,
                    "seed": recipe.trainer.seed, "total_steps": int(total_steps)},
    }
    return json.loads(json.dumps(key))  # the types a saved key has after reading it back


def _flatten(key: dict) -> dict[str, Any]:
    out = {}
    for section, fields in key.items():
        if isinstance(fields, dict):
            out.update({f"{section}.{name}": value for name, value in fields.items()})
        else:
            out[section] = fields
    return out


def _shown(name: str, value: Any) -> str:
    if name in ("tokenizer.fingerprint", "data.samples_sha256") and isinstance(value, str):
        return value[:_SHOWN_HEX]
    return repr(value)


def check_resume_key(saved: Optional[dict], now: dict, checkpoint: str | Path) -> list[str]:
    """Raise :class:`RecipeError` naming the first field of ``now`` whose value differs from
    ``saved`` (the key stored with ``checkpoint``). Returns the fields ``saved`` does not
    record (checkpoints written before they were part of the key): not checked."""
    name = Path(checkpoint).name
    if saved is None:  # saved without a key: nothing to compare with
        return list(now)
    if saved.get("command") != now["command"]:
        raise RecipeError(f"resume: checkpoint {name} was written by `wmss {saved.get('command')}`"
                          f", not `wmss {now['command']}`; start a new run directory")
    old_fields = {**_LEGACY_VALUES, **_flatten(saved)}
    unchecked = []
    for field, value in _flatten(now).items():
        if field not in old_fields:
            unchecked.append(field)
            continue
        if old_fields[field] != value:
            what = {"tokenizer.fingerprint": " (vocabulary and chat template)",
                    "data.samples_sha256": " (the tokenized samples of data.paths)"}.get(field, "")
            raise RecipeError(
                f"resume: {field}{what} changed from {_shown(field, old_fields[field])} to "
                f"{_shown(field, value)} since checkpoint {name}; start a new run directory "
                "(or restore the old setting)")
    return unchecked
