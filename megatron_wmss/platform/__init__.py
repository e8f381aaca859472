"""Platform layer: device and backend detection, and the CPU shims for megatron-core.

Everything in megatron_wmss that touches CUDA assumptions of megatron-core goes through here.
"""

from megatron_wmss.platform.backends import (
    apex_available,
    cuda_available,
    default_device,
    te_available,
)
from megatron_wmss.platform.cpu_shims import SHIMS, apply_cpu_shims, applied_shims

__all__ = [
    "SHIMS",
    "apex_available",
    "applied_shims",
    "apply_cpu_shims",
    "cuda_available",
    "default_device",
    "te_available",
]
