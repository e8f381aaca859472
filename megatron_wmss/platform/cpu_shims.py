"""CPU shims for megatron-core 0.16.x (placeholder: the real registry is being written)."""

from __future__ import annotations

from typing import Callable, Iterable

SHIMS: dict[str, Callable[[], None]] = {}
_APPLIED: set[str] = set()


def apply_cpu_shims(skip: Iterable[str] = ()) -> list[str]:
    return []


def applied_shims() -> list[str]:
    return sorted(_APPLIED)
