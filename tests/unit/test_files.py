"""Publishing directories: a complete copy on disk at every instant, nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_wmss.platform import files


def _dir(path, text):
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_replace_swaps_in_the_new_directory_and_removes_the_old(tmp_path):
    final = _dir(tmp_path / "ckpt", "old")
    files.replace_directory(_dir(tmp_path / "ckpt.tmp", "new"), final)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_crash_during_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    final = _dir(tmp_path / "ckpt", "old")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # after moving the old one aside, before moving the new one in
            raise OSError("preempted")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="preempted"):
        files.replace_directory(_dir(tmp_path / "ckpt.tmp", "new"), final)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.old-")]
    assert len(kept) == 1 and (kept[0] / "weights").read_text() == "old"
    assert (tmp_path / "ckpt.tmp" / "weights").read_text() == "new"


def test_publishing_directory_syncs_every_file_before_the_rename(tmp_path, monkeypatch):
    final = _dir(tmp_path / "ckpt", "old")
    events, real_replace = [], os.replace
    monkeypatch.setattr(files, "_fsync", lambda path: events.append(("sync", str(path))))
    monkeypatch.setattr(files.os, "replace",
                        lambda src, dst: (events.append(("rename", str(dst))),
                                          real_replace(src, dst)))
    with files.publishing_directory(final, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "shard").write_text("new")
        (tmp / "weights").write_text("new")
    renamed_in = events.index(("rename", str(final)))
    synced = {path for kind, path in events[:renamed_in] if kind == "sync"}
    assert synced == {str(tmp), str(tmp / "sub"), str(tmp / "sub" / "shard"),
                      str(tmp / "weights")}
    assert ("sync", str(tmp_path)) in events[renamed_in:]  # the renames themselves
    assert (final / "sub" / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_publishing_directory_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    final = _dir(tmp_path / "ckpt", "old")
    with pytest.raises(FileExistsError, match="overwrite"):
        with files.publishing_directory(final):
            pass
    with pytest.raises(RuntimeError, match="crash"):
        with files.publishing_directory(final, overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (final / "weights").read_text() == "old"


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(FileExistsError, match="out"):
        with files.publishing_directory(final) as tmp:
            (tmp / "weights").write_text("mine")
            _dir(final, "someone else's")
    assert (final / "weights").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _collective_write(root: str, fail_rank: int | None, overwrite: bool = False) -> str:
    import torch.distributed as dist

    rank = dist.get_rank()
    try:
        with files.publishing_directory(f"{root}/ckpt", overwrite, collective=True) as tmp:
            (tmp / f"rank{rank}").write_text(str(rank))
            if rank == fail_rank:
                raise ValueError(f"rank {rank} broke")
    except Exception as err:  # noqa: BLE001 - the test compares what each rank saw
        return f"{type(err).__name__}: {err}"
    return "ok"


def _three_collective_writes(root: str) -> list[tuple[str, list[str]]]:
    """A fresh write, a refused one, a failing overwrite; what this rank saw after each."""
    import torch.distributed as dist

    seen = []
    for fail_rank, overwrite in ((None, False), (None, False), (1, True)):
        outcome = _collective_write(root, fail_rank, overwrite)
        # Rank 0 may still be removing a failed write's temporary directory: list after it.
        dist.barrier()
        seen.append((outcome, sorted(p.relative_to(root).as_posix()
                                     for p in Path(root).rglob("*"))))
    return seen


def test_collective_publishing_is_all_or_nothing(tmp_path):
    from megatron_wmss.testing import run_distributed

    published = ["ckpt", "ckpt/rank0", "ckpt/rank1"]
    rank0, rank1 = run_distributed(_three_collective_writes, 2, args=(str(tmp_path),))
    # Rank-parallel writers: one directory, visible to every rank once every rank finished.
    assert rank0[0] == rank1[0] == ("ok", published)
    # Every rank refuses the existing output alike (rank 0 checks, all raise).
    assert rank0[1][0].startswith("FileExistsError") and rank1[1][0] == rank0[1][0]
    # One rank fails: nobody publishes, the others learn which rank failed and why, no
    # leftovers.
    assert rank1[2][0] == "ValueError: rank 1 broke"
    assert rank0[2][0].startswith("PeerFailure: rank 1 failed (writing "), rank0[2]
    assert rank0[2][0].endswith("nothing was published): rank 1 broke"), rank0[2]
    assert rank0[2][1] == published


def test_write_file_atomic_replaces_whole_or_not_at_all(tmp_path):
    from megatron_wmss.platform.files import write_file_atomic

    path = tmp_path / "f.json"
    write_file_atomic(path, "old")
    write_file_atomic(path, b"new")
    assert path.read_text() == "new"

    def broken_writer(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(path, writer=broken_writer)
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
