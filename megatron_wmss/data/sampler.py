"""Deterministic, resumable sampling over data-parallel ranks, and the active-set file format.

Global order: epoch e visits the ``n`` entries of ``rows`` in the permutation drawn from
``(seed, e)``. A *global micro-step* takes the next ``micro_batch_size * dp_size`` entries and
rank r gets the r-th block of ``micro_batch_size``. ``consumed_samples`` counts entries taken by
all ranks together since epoch 0 (Megatron's counter), so a resumed run continues the sequence
exactly where the saved one stopped. No global state: rank and world size are arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from megatron_wmss.data.schemas import DataFormatError
from megatron_wmss.data.sources import iter_json_records

__all__ = ["DistributedEpochSampler", "read_active_set", "write_active_set"]


class DistributedEpochSampler:
    """Yields micro-batches (lists of dataset rows) for one data-parallel rank.

    ``rows`` is the number of dataset rows (visit each once per epoch) or a list of rows that may
    repeat (an active set with multiplicity). With ``drop_last`` the tail of an epoch shorter than
    one global micro-step is left out of that epoch (``dropped_per_epoch`` says how many); without
    it the last step is partial and some ranks get a short or no last micro-batch.
    ``epoch_multiple`` (with ``drop_last``): cut each epoch to a multiple of this many samples
    instead (the trainer passes its global batch size).
    """

    def __init__(self, rows: int | Sequence[int], *, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, consumed_samples: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_epochs: int | None = 1,
                 epoch_multiple: int | None = None) -> None:
        for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1),
                                 ("seed", seed, 0), ("consumed_samples", consumed_samples, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} = {value!r} is invalid; allowed: an int >= {low}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank!r} is invalid; allowed: 0 <= dp_rank < "
                             f"dp_size = {dp_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs = {num_epochs!r} is invalid; allowed: null or >= 1")
        self.rows = (np.arange(rows, dtype=np.int64) if isinstance(rows, (int, np.integer))
                     else np.asarray(rows, dtype=np.int64).reshape(-1))
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
        self.step_samples = self.micro_batch_size * self.dp_size
        n = self.rows.size
        # An epoch is cut to a multiple of one global micro-step (or of ``epoch_multiple``, a
        # multiple of it: a global batch), so every rank runs the same micro-batch count.
        multiple = self.step_samples if epoch_multiple is None else int(epoch_multiple)
        if multiple % self.step_samples:
            raise ValueError(f"epoch_multiple = {epoch_multiple!r} is invalid; allowed: a "
                             f"multiple of micro_batch_size x dp_size = {self.step_samples}")
        self.samples_per_epoch = (n // multiple) * multiple if drop_last else n
        if self.samples_per_epoch == 0:
            raise ValueError(f"{n} samples do not fill one global micro-step of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size}; lower either or add data")
        self.dropped_per_epoch = n - self.samples_per_epoch
        position = consumed_samples % self.samples_per_epoch
        if position % self.step_samples:
            raise ValueError(
                f"consumed_samples = {consumed_samples} is {position} samples into an epoch, not "
                f"a multiple of micro_batch_size x dp_size = {self.step_samples}; resume with "
                f"the micro-batch size and data-parallel size the run was saved with")
        self.consumed_samples = int(consumed_samples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[n] rows in the order epoch ``epoch`` visits them (all ranks together)."""
        if not self.shuffle:
            return self.rows
        # SeedSequence([seed, epoch]): independent streams per epoch, same on every rank.
        return self.rows[np.random.default_rng([self.seed, epoch]).permutation(self.rows.size)]

    def _end(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.samples_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        consumed, end = self.consumed_samples, self._end()
        while end is None or consumed < end:
            epoch, position = divmod(consumed, self.samples_per_epoch)
            order = self.epoch_order(epoch)
            for start in range(position, self.samples_per_epoch, self.step_samples):
                first = start + self.dp_rank * self.micro_batch_size
                last = min(first + self.micro_batch_size, start + self.step_samples,
                           self.samples_per_epoch)
                if first < last:
                    yield order[first:last].tolist()
            consumed = (epoch + 1) * self.samples_per_epoch

    def __len__(self) -> int:
        """Micro-batches this rank yields from ``consumed_samples`` to the last epoch's end."""
        end = self._end()
        if end is None:
            raise TypeError("an endless sampler (num_epochs = None) has no length")
        remaining = max(end - self.consumed_samples, 0)
        full, tail = divmod(self.samples_per_epoch, self.step_samples)
        # Rank r's share of a partial last step (drop_last = False): 0 or 1 micro-batch.
        per_epoch = full + int(tail > self.dp_rank * self.micro_batch_size)
        epochs, left = divmod(remaining, self.samples_per_epoch)
        current = 0
        if left:  # resumed inside an epoch, `left` of its samples remain
            current = per_epoch - (self.samples_per_epoch - left) // self.step_samples
        return epochs * per_epoch + current


def read_active_set(path: str) -> np.ndarray:
    """[n] int64 sample idx of an active-set file, duplicates kept, in file order.

    Accepted: a JSON array of ints, a JSON object whose "idx" is such an array, or JSON Lines
    with one int or one object with an int "idx" per line. An object may carry an int
    ``"multiplicity"`` >= 1 (``wmss select`` writes one per sample): its idx then occurs that
    many times in a row; without it, once. Other keys are ignored.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"active set file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # not one JSON document: JSON Lines, whose reader names the bad line
    if isinstance(document, dict) and isinstance(document.get("idx"), list):
        document = document["idx"]
    if isinstance(document, list):
        records: Iterable[tuple[int, object]] = ((0, v) for v in document)
    elif document is None:
        records = iter_json_records(path)
    else:  # a one-line JSON Lines file
        records = [(1, document)]
    values: list[int] = []
    for lineno, record in records:
        where = f"{path}:{lineno}" if lineno else path
        value = record.get("idx") if isinstance(record, dict) else record
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataFormatError(f"{where}: active set entry {record!r:.60} is not an integer "
                                  f"idx; accepted: a JSON array of ints, {{\"idx\": [ints]}}, or "
                                  f"JSON Lines of ints or {{\"idx\": int, \"multiplicity\": int}}")
        multiplicity = record.get("multiplicity", 1) if isinstance(record, dict) else 1
        if (isinstance(multiplicity, bool) or not isinstance(multiplicity, int)
                or multiplicity < 1):
            raise DataFormatError(f"{where}: active set entry for idx {value} has multiplicity "
                                  f"{multiplicity!r:.30}; accepted: an int >= 1 (or no "
                                  f"multiplicity: once)")
        values.extend([value] * multiplicity)
    if not values:
        raise DataFormatError(f"active set file {path} lists no idx")
    return np.asarray(values, dtype=np.int64)


def write_active_set(path: str, idx: Iterable[int]) -> None:
    """Write ``idx`` (duplicates kept) as a JSON array that :func:`read_active_set` reads."""
    values = [int(i) for i in idx]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated active set behind
