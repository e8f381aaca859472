"""Full training state on disk: resumable checkpoints of a run, with a ``latest`` pointer.

    RUN_DIR/checkpoints/iter_0000005/        megatron distributed checkpoint (torch_dist):
        model weights at the top level       (the same keys as a weights-only checkpoint, so
                                              export-hf, extract and init load it as is),
        optimizer/…                          fp32 master weights, Adam moments, step,
        rng/…                                per rank: CPU, CUDA, megatron's tracker, python and
                                              numpy RNG states,
        train_state.json                     step, consumed samples, skip counters, data seed,
                                              LR scheduler, what a resume must not change,
        wmss_model.json, tokenizer/          the model description (export needs no flags)
        manifest.json                        every other file's size and CRC-32
    RUN_DIR/checkpoints/latest               the name of the newest complete checkpoint
    RUN_DIR/checkpoints/iter_0000012-nonfinite/  saved when a run stops on non-finite steps
    RUN_DIR/checkpoints/iter_0000009-damaged/    one that failed its manifest check at resume

A checkpoint is written into a temporary sibling and renamed in only after every rank finished
(:func:`~megatron_wmss.platform.files.publishing_directory`, synced to disk first); then rank 0
rewrites ``latest`` atomically and deletes checkpoints beyond ``keep_last``. A crash at any
point leaves the previous checkpoint complete and ``latest`` naming it. Loading works at any
tensor/pipeline/data-parallel layout (the optimizer state is saved fully reshardable); RNG
states are restored only at the layout they were saved at.

Storage failures stop the run with :class:`CheckpointIOError` (exit status
:data:`CHECKPOINT_IO_EXIT_CODE`): a save that runs out of space (:class:`CheckpointSpaceError`;
its temporary directory is removed, the previous checkpoint and ``latest`` stay), or a resume
that finds every checkpoint damaged (:class:`DamagedCheckpointError`). A damaged newest
checkpoint with an intact older one is set aside and the run resumes from the older one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_wmss.platform import cuda_available
from megatron_wmss.platform.files import (
    CollectiveAbandoned,
    publishing_directory,
    write_file_atomic,
)
from megatron_wmss.platform.manifest import (
    MANIFEST_FILE,
    ManifestCheck,
    check_manifest,
    record_manifest,
)
from megatron_wmss.platform.ranks import on_rank_zero

__all__ = ["CHECKPOINT_IO_EXIT_CODE", "CheckpointIOError", "CheckpointSpaceError",
           "DamagedCheckpointError", "TrainState", "checkpoint_name", "find_intact_checkpoint",
           "find_resume_checkpoint", "load_training_checkpoint", "read_train_state",
           "save_training_checkpoint"]

STATE_FILE = "train_state.json"
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")

#: Exit status of a run stopped by its checkpoint storage: no space for a checkpoint, or no
#: intact checkpoint to resume from. Not 75 (PREEMPTION_EXIT_CODE, which launch/wmss.slurm
#: requeues): a rerun fails alike until someone frees space or restores the checkpoints.
CHECKPOINT_IO_EXIT_CODE = 74  # EX_IOERR of sysexits.h
# Without a previous checkpoint to size the next one by: a save that fails with less than this
# free after its temporary directory is gone failed for want of space.
_LOW_SPACE = 64 << 20


class CheckpointIOError(OSError):
    """Checkpoint storage stopped the run (:data:`CHECKPOINT_IO_EXIT_CODE`); the message is one
    line naming the directory. ``every_rank``: raised on every rank alike; False: on this rank
    alone (its peers wait in a collective, and the launcher ends them when it exits)."""

    def __init__(self, message: str, every_rank: bool = True) -> None:
        super().__init__(message)
        self.every_rank = every_rank

    def __reduce__(self):
        return type(self), (str(self), self.every_rank)


class CheckpointSpaceError(CheckpointIOError):
    """A save ran out of space; nothing was published, ``latest`` names the previous one."""


class DamagedCheckpointError(CheckpointIOError):
    """Every checkpoint a resume could use failed its manifest check."""


@dataclass
class TrainState:
    """Counters of the training loop (everything but tensors)."""

    step: int = 0
    """Optimizer iterations done (skipped ones included); also the λ-schedule position."""
    consumed_samples: int = 0
    """Samples taken by all data-parallel ranks together (the sampler's resume point)."""
    skipped_steps: int = 0
    """Iterations whose loss or gradient norm was not finite (no update made)."""
    nonfinite_in_row: int = 0
    """Consecutive non-finite iterations up to now."""
    data_seed: int = 0
    """Seed of the data order (checked on resume: another seed would repeat samples)."""
    total_steps: int = 0
    """Iterations the run was planned with."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _optimizer_metadata() -> dict:
    # Fully reshardable: the distributed optimizer's state loads at any TP/PP/DP layout. On CPU
    # the memory-efficient variant gathers over gloo (the other one uses .cuda()).
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": not cuda_available()}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: Optional[dict]):
    """One RNG object per rank (pipeline, tensor, data-parallel): each restores its own."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
         ps.get_data_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
         ps.get_data_parallel_rank()),
        replica_id=0)


def _sharded_state(setup, is_loading: bool, with_rng: bool) -> dict:
    from megatron_wmss.models.checkpoint import unwrap_model

    module = unwrap_model(setup.model[0])
    model_sd = module.sharded_state_dict()
    state = dict(model_sd)
    state["optimizer"] = setup.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=_optimizer_metadata())
    if with_rng:
        state["rng"] = _rng_sharded(None if is_loading else _rng_state())
    return state


def _layout() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size()]


def _write_json(path: Path, payload: dict) -> None:
    write_file_atomic(path, json.dumps(payload, indent=2))


def save_training_checkpoint(setup, state: TrainState, checkpoints_dir: str | os.PathLike, *,
                             keep_last: int, metadata_writer=None, nonfinite: bool = False,
                             recipe_key: Optional[dict] = None) -> Path:
    """Collectively write the full training state after ``state.step`` iterations.

    ``metadata_writer(directory)`` (rank 0, inside the temporary directory) adds the model
    description. ``nonfinite`` names the checkpoint ``…-nonfinite`` and leaves ``latest`` and
    the retention alone. Returns the published directory. Raises
    :class:`CheckpointSpaceError` when the filesystem has no room for it.
    """
    root = Path(checkpoints_dir)
    name = checkpoint_name(state.step) + ("-nonfinite" if nonfinite else "")
    final = root / name
    payload = {"train_state": asdict(state), "scheduler": setup.scheduler.state_dict(),
               "layout": _layout(), "recipe": recipe_key,
               "manifest": True}  # a resume that finds no manifest.json then knows it is lost

    def point_latest() -> None:
        if not nonfinite:
            _write_json(root / LATEST, {"checkpoint": name, "step": state.step})
            _retain(root, keep_last, keep=name)

    previous = find_resume_checkpoint(root)
    try:
        # A rerun may find the directory of a step it saved before a crash: same step, data.
        with publishing_directory(final, overwrite=True, collective=True, tag="save") as tmp:
            _write_checkpoint(setup, tmp, payload, metadata_writer)
        on_rank_zero(point_latest, f"checkpoint {name}", share=False)
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        full = _out_of_space(err, root, name, previous)
        if full is not None:
            raise full from err
        if isinstance(err, CollectiveAbandoned) and err.__cause__ is not None:
            raise err.__cause__ from None  # the error itself: its type decides the exit status
        raise
    return final


def _write_checkpoint(setup, tmp: Path, payload: dict, metadata_writer) -> None:
    """Collectively write the checkpoint into ``tmp``: shards, rank 0's files, the manifest
    (after every rank finished writing, before the rename that publishes it)."""
    from megatron.core import dist_checkpointing

    try:
        with _writer_errors_unlogged():
            dist_checkpointing.save(_sharded_state(setup, is_loading=False, with_rng=True),
                                    str(tmp))
    except Exception as err:
        # A failed shard write reaches every rank as megatron's CheckpointException (a
        # BaseException: not caught here). An Exception was raised on this rank alone, between
        # megatron's collectives (rank 0 writes common.pt, .metadata and metadata.json by
        # itself), where the peers now wait: no further collective can match theirs.
        raise CollectiveAbandoned(f"rank {dist.get_rank()}: {type(err).__name__}: {err}") \
            from err

    def rank0_files() -> None:
        _write_json(tmp / STATE_FILE, payload)
        if metadata_writer is not None:
            metadata_writer(tmp)

    on_rank_zero(rank0_files, f"writing {tmp / STATE_FILE}", share=False)
    record_manifest(tmp, collective=True)


@contextlib.contextmanager
def _writer_errors_unlogged() -> Iterator[None]:
    """Drop the error megatron's writer logs for a failed shard write ("Local process 0
    encountered an error: [Errno 28] ..."): the save raises it too, and the run reports it
    once, in one line (its traceback with WMSS_DEBUG=1)."""
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Local process ")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _mentions_no_space(err: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain of causes (by errno, or by text where a writer
    turned the OSError into a message: megatron's workers, PeerFailure)."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _space_verdict(mentioned: bool, root: Path, name: str, previous: Optional[Path]
                   ) -> Optional[str]:
    """The one-line message when a save failed for want of space, else None. Measured after
    the temporary directory is gone: the previous checkpoint's size is what the new one
    needs."""
    try:
        where = root if root.is_dir() else next(p for p in root.parents if p.is_dir())
        free = shutil.disk_usage(where).free
        needed = _tree_bytes(previous) if previous is not None and previous.is_dir() else None
    except OSError:  # cannot tell: report the save's own error
        return None
    if not mentioned and free >= (_LOW_SPACE if needed is None else needed):
        return None
    need = f"about {_human(needed)}" if needed is not None else "more"
    kept = (f"{previous.name} and `latest` are intact" if previous is not None
            else "no checkpoint was published")
    return (f"no space left to save checkpoint {name} in {root}: it needs {need}, "
            f"{_human(free)} free; {kept}; free some space and rerun the same command to "
            "resume")


def _out_of_space(err: BaseException, root: Path, name: str, previous: Optional[Path]
                  ) -> Optional[CheckpointSpaceError]:
    """``err`` (a failed save) as a CheckpointSpaceError, or None when space was not why.

    Every error but :class:`CollectiveAbandoned` was raised on every rank (megatron's
    CheckpointException, or through the publishing collectives), so the ranks decide together:
    rank 0 measures, after its cleanup, and every rank raises the same error."""
    mentioned = _mentions_no_space(err)
    if isinstance(err, CollectiveAbandoned):
        verdict = _space_verdict(mentioned, root, name, previous)
        return None if verdict is None else CheckpointSpaceError(verdict, every_rank=False)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, mentioned)
    verdict = on_rank_zero(lambda: _space_verdict(any(flags), root, name, previous),
                           "checking free space")
    return None if verdict is None else CheckpointSpaceError(verdict)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for path in root.iterdir():
            match = _ITER.match(path.name)
            if match and (path / "metadata.json").is_file() and (path / STATE_FILE).is_file():
                out.append((int(match.group(1)), path))
    return sorted(out)


def _retain(root: Path, keep_last: int, keep: str) -> None:
    for _, path in _complete_checkpoints(root)[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a rerun resumes from: the one ``latest`` names when it is complete, else
    the newest complete one; None when there is none. Non-finite checkpoints never count."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            named = None
        if named is not None and _ITER.match(named.name) and \
                (named / "metadata.json").is_file() and (named / STATE_FILE).is_file():
            return named
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def _resume_candidates(root: Path) -> list[Path]:
    """What a resume may use, in order: :func:`find_resume_checkpoint`'s choice, then the other
    complete checkpoints, newest first."""
    first = find_resume_checkpoint(root)
    if first is None:
        return []
    return [first] + [p for _, p in reversed(_complete_checkpoints(root)) if p != first]


def _written_with_manifest(path: Path) -> bool:
    try:
        return read_train_state(path).get("manifest") is True
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: megatron's load will say what is wrong with it


def _set_aside(path: Path) -> str:
    """Rename a damaged checkpoint ``…-damaged`` (out of every later choice); say what
    happened."""
    aside = path.with_name(path.name + "-damaged")
    try:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    except OSError as err:
        return f"{path.name} left in place: {err.strerror or err}"
    return f"{path.name} moved to {aside.name}"


def find_intact_checkpoint(checkpoints_dir: str | os.PathLike,
                           log: Callable[[str], None] = print) -> Optional[Path]:
    """Collective (when torch.distributed is initialized): the checkpoint a rerun resumes from,
    checked against its manifest.

    Tries :func:`find_resume_checkpoint`'s choice, then older complete checkpoints. A damaged
    one is said in ``log`` (rank 0) with the file, renamed ``…-damaged`` (kept for a look,
    never tried again) once an older intact one is found. A checkpoint without a manifest
    (written before manifests) is accepted, said in ``log``. None when there is no checkpoint;
    :class:`DamagedCheckpointError` (every rank) when every one is damaged: nothing is renamed
    then, so that a rerun cannot silently start the run over.
    """
    root = Path(checkpoints_dir)
    collective = dist.is_initialized()  # else: one process (tools, tests)
    rank0 = not collective or dist.get_rank() == 0
    candidates = on_rank_zero(lambda: [str(p) for p in _resume_candidates(root)],
                              f"listing {root}")
    damaged = []
    for path in map(Path, candidates):
        check = check_manifest(path, collective=collective)
        if check.intact and not check.has_manifest and on_rank_zero(
                lambda: _written_with_manifest(path), f"reading {path / STATE_FILE}"):
            check = ManifestCheck(f"{MANIFEST_FILE}: missing", True)
        if not check.intact:
            damaged.append((path, check.problem))
            continue
        if rank0:
            for bad, problem in damaged:
                log(f"checkpoint {bad.name} is damaged ({problem}); resuming from {path.name} "
                    f"({_set_aside(bad)})")
            if not check.has_manifest:
                log(f"checkpoint {path.name} has no {MANIFEST_FILE} (written before manifests): "
                    "resuming from it unchecked")
        return path
    if damaged:
        listed = "; ".join(f"{path.name} is damaged ({problem})" for path, problem in damaged)
        raise DamagedCheckpointError(
            f"no intact checkpoint to resume from in {root}: {listed}; restore them, or move "
            f"{root} aside to start the run over")
    return None


def read_train_state(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_training_checkpoint(setup, directory: str | os.PathLike) -> TrainState:
    """Collectively load model(s), optimizer, scheduler and (same layout only) RNG states."""
    from megatron.core import dist_checkpointing

    from megatron_wmss.models.checkpoint import unwrap_model

    payload = read_train_state(directory)
    same_layout = payload.get("layout") == _layout()
    module = unwrap_model(setup.model[0])
    loaded = dist_checkpointing.load(_sharded_state(setup, is_loading=True, with_rng=same_layout),
                                     str(directory))
    optimizer_state = loaded.pop("optimizer")
    rng = loaded.pop("rng", None)
    with torch.no_grad():
        module.load_state_dict(loaded, strict=True)
    setup.optimizer.load_state_dict(optimizer_state)
    setup.scheduler.load_state_dict(payload["scheduler"])
    if rng is not None:
        _set_rng_state(rng)
    state = TrainState(**payload["train_state"])
    setup.step = state.step
    return state

