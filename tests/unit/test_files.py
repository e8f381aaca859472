"""Directory replacement keeps a complete copy on disk at every instant."""

from __future__ import annotations

import os

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
