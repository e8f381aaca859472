"""Which accelerator and optional GPU libraries this process can use.

Transformer Engine and Apex ship with NVIDIA's containers and cannot be installed on a CPU
machine. They are imported lazily and only when CUDA exists: a broken TE install raises
RuntimeError (not ImportError) at import, which would otherwise take ``import megatron.core``
down with it.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["apex_available", "cuda_available", "default_device", "te_available"]


def cuda_available() -> bool:
    """True when a CUDA device is usable by torch in this process."""
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device models and batches live on: the current CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    if not cuda_available():
        return False
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - TE raises RuntimeError when its CUDA libs are off
        logger.info("%s is not usable (%s: %s)", module, type(exc).__name__, exc)
        return False
    return True


def te_available() -> bool:
    """True when CUDA is present and Transformer Engine imports cleanly."""
    return _importable("transformer_engine.pytorch")


def apex_available() -> bool:
    """True when CUDA is present and NVIDIA Apex (not the unrelated PyPI ``apex``) imports."""
    return _importable("apex.normalization")
