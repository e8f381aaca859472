"""Floating-point dtypes by name: the one table that configs, HF files and torch agree on.

Names are torch's attribute names (``"bfloat16"``), which are also what HF ``config.json``
writes under ``dtype`` / ``torch_dtype``. torch is imported only when a ``torch.dtype`` is asked
for, so ``megatron_wmss.config`` stays light.
"""

from __future__ import annotations

__all__ = ["PARAMS_DTYPES", "WEIGHT_DTYPES", "dtype_name", "params_dtype_for", "torch_dtype"]

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes weights may be stored, imported and exported in."""

PARAMS_DTYPES = ("float32", "bfloat16")
"""Dtypes a model trains in (``ModelConfig.params_dtype``); float16 would need loss scaling."""


def dtype_name(value) -> str | None:
    """The weight-dtype name of ``value`` (``"bfloat16"``, ``"torch.bfloat16"`` or
    ``torch.bfloat16``), or None when it is none of :data:`WEIGHT_DTYPES`."""
    name = str(value).removeprefix("torch.")
    return name if name in WEIGHT_DTYPES else None


def params_dtype_for(weight_dtype: str) -> str:
    """The params dtype that holds weights stored as ``weight_dtype`` without loss: float16
    becomes float32, the others stay."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights stored as {weight_dtype!r} are not supported; supported: "
                         f"{sorted(WEIGHT_DTYPES)}")
    return "float32" if weight_dtype == "float16" else weight_dtype


def torch_dtype(name: str):
    """The ``torch.dtype`` named ``name``, one of :data:`WEIGHT_DTYPES`."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; supported: {sorted(WEIGHT_DTYPES)}")
    import torch

    return getattr(torch, name)
