"""Typed configuration owned by the components that use it; YAML recipes fill these."""

from megatron_wmss.config.model import (
    ARCHITECTURE_FIELDS,
    ModelConfig,
    ParallelConfig,
    check_same_architecture,
)
from megatron_wmss.config.training import MixConfig, OptimConfig
from megatron_wmss.config.vocab import padded_vocab_size

__all__ = [
    "ARCHITECTURE_FIELDS",
    "MixConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "check_same_architecture",
    "padded_vocab_size",
]
