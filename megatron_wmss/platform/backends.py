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
import re
import warnings

import torch

logger = logging.getLogger(__name__)

__all__ = ["apex_available", "cuda_available", "default_device",
           "quiet_expected_megatron_warnings", "te_available"]


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


# What megatron-core 0.16 warns at import / model build when Transformer Engine and Apex are
# absent (it falls back to torch optimizers, local multi-tensor kernels and torch norms).
# Without CUDA, its advice to set CUDA_DEVICE_MAX_CONNECTIONS (a CUDA stream setting) is moot.
_FALLBACK_WARNINGS = (("Transformer Engine and Apex are not installed", UserWarning),
                      ("Apex is not installed", UserWarning),
                      ("When using async grad allreduce it is recommended to set the "
                       "environment variable CUDA_DEVICE_MAX_CONNECTIONS", UserWarning))
# Warned about megatron-core's own choices on any device: every TransformerConfig that keeps its
# default cuda_graph_scope="full", and dist_checkpointing's calls of deprecated torch APIs.
_MEGATRON_DEPRECATIONS = (("full scope is deprecated", UserWarning),
                          ("`load_state_dict` is deprecated", FutureWarning),
                          ("Please use DTensor instead and we are deprecating ShardedTensor",
                           FutureWarning))


def quiet_expected_megatron_warnings() -> None:
    """Hide megatron-core warnings that say nothing a user can act on, in this process.

    Without CUDA the TE/Apex fallbacks are the intended path (the local spec), so their warnings
    are hidden; with CUDA they are kept, since there they mean a degraded install. Call before
    megatron-core is imported (its fallback warnings are issued at import time).
    """
    hidden = _MEGATRON_DEPRECATIONS + (() if cuda_available() else _FALLBACK_WARNINGS)
    for message, category in hidden:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
