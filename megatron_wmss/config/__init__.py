"""Typed configuration owned by the components that use it; YAML recipes fill these."""

from megatron_wmss.config.dtypes import (
    PARAMS_DTYPES,
    WEIGHT_DTYPES,
    dtype_name,
    params_dtype_for,
    torch_dtype,
)
from megatron_wmss.config.model import (
    ARCHITECTURE_FIELDS,
    ModelConfig,
    ParallelConfig,
    check_same_architecture,
)
from megatron_wmss.config.training import MemoryConfig, MixConfig, OptimConfig, SFTLossConfig
from megatron_wmss.config.vocab import padded_vocab_size

__all__ = [
    "ARCHITECTURE_FIELDS",
    "MemoryConfig",
    "MixConfig",
    "ModelConfig",
    "OptimConfig",
    "SFTLossConfig",
    "PARAMS_DTYPES",
    "ParallelConfig",
    "WEIGHT_DTYPES",
    "check_same_architecture",
    "dtype_name",
    "padded_vocab_size",
    "params_dtype_for",
    "torch_dtype",
]
