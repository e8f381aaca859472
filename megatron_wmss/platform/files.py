"""Filesystem steps shared by everything that writes checkpoints or models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_directory"]


def replace_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the finished directory ``tmp`` become ``final``, replacing what was there.

    The old ``final`` is renamed aside before the new one is renamed in, and deleted only
    after: at every instant a complete copy exists under ``final`` or ``final.old-<pid>``, so
    preemption during an overwrite never loses the last good checkpoint.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
