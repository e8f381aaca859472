"""The peak memory of one piece of work on this rank (a ``wmss run`` stage), as ``wmss plan``
predicts it.

On a GPU: the caching allocator's peak (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``), every tensor live on the device, whatever earlier work left.
On CPU (Linux): the growth of the process's peak resident set (``VmHWM``, reset from the
current RSS through ``/proc/self/clear_refs``) over its RSS when the work started. glibc keeps
freed heap blocks for reuse, so a stage can reuse what an earlier one freed without growing
the RSS; for exact figures start the process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block
of 64 KiB or more its own mapping, returned on free), as ``bench/rehearsal.py`` does. Where
neither is available (CPU without ``/proc``) nothing is measured.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["PeakMemory", "reset_peak_rss", "status_kib"]

_STATUS = "/proc/self/status"


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    with open(_STATUS) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """VmHWM (peak RSS) starts again from the current RSS (Linux clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """``start()`` before the work, ``stop()`` after: ``{"bytes": N, "how": ...}`` or None."""

    def __init__(self) -> None:
        from megatron_wmss.platform.backends import cuda_available

        self._cuda = cuda_available()
        self._base: Optional[int] = None

    def start(self) -> None:
        self._base = None
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._base = 0
            return
        try:
            reset_peak_rss()
            self._base = status_kib("VmRSS") * 1024
        except (OSError, StopIteration):  # no procfs (macOS) or an old kernel
            self._base = None

    def stop(self) -> Optional[dict]:
        if self._base is None:
            return None
        if self._cuda:
            import torch

            return {"bytes": int(torch.cuda.max_memory_allocated()),
                    "how": "cuda_max_memory_allocated"}
        try:
            peak = status_kib("VmHWM") * 1024
        except (OSError, StopIteration):
            return None
        return {"bytes": max(0, peak - self._base), "how": "rss_growth"}
