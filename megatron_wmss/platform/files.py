"""Publishing output directories atomically: write a temporary sibling, sync it, rename it in.

Everything that writes checkpoints or models goes through :func:`publishing_directory`, so the
same rules hold everywhere: an existing output is refused unless ``overwrite``; nothing
half-written ever stands under the final name; an overwrite keeps the old copy aside until the
new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_wmss.platform.errors import PeerFailure, exception_message, is_user_error
from megatron_wmss.platform.ranks import settle

__all__ = ["CollectiveAbandoned", "check_output_dir", "fsync_tree", "publishing_directory",
           "replace_directory", "write_file_atomic"]


class CollectiveAbandoned(RuntimeError):
    """Raised on a rank that failed between the collectives of a rank-parallel writer (a
    rank-0-only write inside ``dist_checkpointing.save``, say) while its peers wait in one it
    will never join. ``publishing_directory(collective=True)`` then runs no collective (none
    could match them: every rank would hang), removes the temporary directory from this rank
    and re-raises; the launcher ends the waiting peers once this rank exits. The original
    error is ``__cause__``."""


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output ``path`` unless ``overwrite`` (FileExistsError naming it)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output directory {path} exists; pass --overwrite "
                              "(overwrite=True) to replace it")
    return path


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under ``root`` (``root`` included) to stable storage.

    Bottom-up, so a directory is synced after the entries it lists. Without this a rename can
    reach the disk before the data it names, and a power loss leaves empty files under the
    final name.
    """
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def replace_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the finished directory ``tmp`` become ``final``, replacing what was there.

    The old ``final`` is renamed aside before the new one is renamed in, and deleted only
    after: at every instant a complete copy exists under ``final`` or ``final.old-<pid>``, so
    preemption during an overwrite never loses the last good checkpoint. The parent directory
    is synced after the renames so that they survive a power loss.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_tmp(final: Path, overwrite: bool, tag: str | None) -> Path:
    """Check ``final`` and create its fresh temporary sibling (same filesystem: the final
    rename is atomic; a dot name: listings and globs of the parent skip it)."""
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{tag + '.' if tag else ''}tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, overwrite: bool, fsync: bool) -> None:
    try:
        check_output_dir(final, overwrite)  # again: something may have appeared meanwhile
        if fsync:
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A failure from here on leaves the pieces where replace_directory says they are.
    replace_directory(tmp, final)


@contextlib.contextmanager
def publishing_directory(final: str | os.PathLike, overwrite: bool = False, *,
                         collective: bool = False, group=None, tag: str | None = None,
                         fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; on success it becomes ``final``.

    An existing ``final`` is refused (FileExistsError) unless ``overwrite``, on entry and again
    just before publishing. On success the tree is synced (``fsync``) and renamed in with
    :func:`replace_directory`. If the body raises, the temporary directory is removed and
    ``final`` is left as it was. ``tag`` goes into the temporary name (which writer left it).

    ``collective=True``: every rank of ``group`` (default: the world) enters with the same
    arguments and writes its part into the same directory (rank-parallel writers such as
    megatron's ``dist_checkpointing.save``). Rank 0 of the group alone checks, creates, syncs
    and renames. Collectives: a broadcast on entry (the path, or rank 0's refusal, so every
    rank raises alike); an all-gather of every rank's success on exit (none publishes if any
    rank raised; the others raise :class:`~megatron_wmss.platform.errors.PeerFailure` with the
    first failing rank's message); a broadcast of rank 0's publishing
    outcome, so that on return every rank sees ``final``. A body that raises
    :class:`CollectiveAbandoned` skips the all-gather (see there). Rank 0 syncs the whole
    tree, which flushes what its node wrote; files written on other nodes are as durable as
    their filesystem makes them on close.
    """
    final = Path(final)
    if collective:
        yield from _collective_publishing(final, overwrite, group, tag, fsync)
        return
    tmp = _make_tmp(final, overwrite, tag)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final, overwrite, fsync)


def _collective_publishing(final: Path, overwrite: bool, group, tag: str | None,
                           fsync: bool) -> Iterator[Path]:
    import torch.distributed as dist

    rank = dist.get_rank(group)
    src = 0 if group is None else dist.get_global_rank(group, 0)

    def from_leader(make):
        """Run ``make`` on rank 0; every rank returns its value or raises its exception."""
        box = [None]
        if rank == 0:
            try:
                box[0] = (make(), None)
            except Exception as err:  # every rank must hear of it, then raise
                box[0] = (None, err)
        dist.broadcast_object_list(box, src=src, group=group)
        value, err = box[0]
        if err is not None:
            raise err
        return value

    def agree(error: Exception | None) -> None:
        """Every rank's outcome; if any failed, rank 0 removes the temporary directory and
        each rank that did not fail raises PeerFailure with the first failure's message."""
        mine = None if error is None else (type(error).__name__, exception_message(error),
                                           is_user_error(error))
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, mine, group=group)
        failed = [r for r, outcome in enumerate(outcomes) if outcome is not None]
        if failed and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed:
            settle(group)
        if failed and error is None:
            first = failed[0] if group is None else dist.get_global_rank(group, failed[0])
            raise PeerFailure(first, f"writing {final}; nothing was published",
                              *outcomes[failed[0]])

    tmp = Path(from_leader(lambda: str(_make_tmp(final, overwrite, tag))))
    try:
        yield tmp
    except CollectiveAbandoned:  # the peers wait in another collective: join none
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:
        agree(err)
        raise
    except BaseException:  # interrupted: no collectives; rank 0 drops what was written
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    agree(None)
    from_leader(lambda: _publish(tmp, final, overwrite, fsync))


def write_file_atomic(path: str | os.PathLike, data: str | bytes | None = None, *,
                      writer=None) -> Path:
    """Replace the file ``path`` atomically: write a hidden sibling, sync it, rename it in.

    Give the content as ``data`` (text is UTF-8), or a ``writer(tmp_path)`` that writes the
    temporary file itself (e.g. a Parquet writer). A reader sees the old file or the new one,
    never a part of it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if writer is not None:
            writer(tmp)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
