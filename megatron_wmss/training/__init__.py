"""Training: model/optimizer assembly and the train step shared by SFT and joint training.

The names below load on first use (PEP 562): ``wmss sft --print-config`` and the recipe checks
of ``megatron_wmss.training.recipe`` then run without importing megatron-core (~3 s).
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "TrainingSetup": "setup",
    "is_weak_param": "setup",
    "setup_training": "setup",
    "StepMetrics": "step",
    "batch_to_device": "step",
    "causal_attention_mask": "step",
    "train_step": "step",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
