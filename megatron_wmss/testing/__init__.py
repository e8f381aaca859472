"""Helpers for testing distributed code: spawned gloo ranks with megatron parallel state.

The test harness runs ranks on CPU with gloo on every machine (GPUs hidden), so the
distributed tests build CPU tensors, compare with CPU references and give the same results
inside a GPU container. CUDA-only checks live in ``tests/gpu``.
"""

from __future__ import annotations

import functools

from megatron_wmss.platform.errors import DistributedRunError
from megatron_wmss.platform.spawn import run_distributed as _run_distributed

__all__ = ["DistributedRunError", "run_distributed"]


@functools.wraps(_run_distributed)
def run_distributed(fn, world_size, **kwargs):
    kwargs.setdefault("device", "cpu")
    return _run_distributed(fn, world_size, **kwargs)
