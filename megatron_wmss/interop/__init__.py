"""Checkpoint interop: HF ⇄ megatron-core for Llama / Qwen2 / Qwen3, and strong-model extraction.

A small, table-driven subset of what megatron-bridge does, for the three decoder families WMSS
uses; megatron-bridge itself needs Python >= 3.12 and Transformer Engine.

- :mod:`.mapping`    the name/layout table (fused QKV, SwiGLU fc1, vocab padding, TP slicing)
- :mod:`.hf_config`  HF config.json ⇄ ModelConfig
- :mod:`.hf_io`      safetensors read/write, tokenizer files, atomic output directories
- :mod:`.metadata`   model description stored beside megatron checkpoints
- :mod:`.convert`    import_hf, export_hf, extract_megatron (collective)
- :mod:`.joint`      phase 3: two single-model checkpoints -> joint model / checkpoint
- :mod:`.cli`        ``wmss import-hf`` / ``export-hf`` / ``extract`` entry points
"""

from megatron_wmss.interop.hf_config import (
    SUPPORTED_ARCHITECTURES,
    hf_config_from_model_config,
    model_config_from_hf,
)
from megatron_wmss.interop.metadata import (
    CheckpointMetadata,
    copy_model_metadata,
    read_model_metadata,
    write_model_metadata,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointMetadata",
    "copy_model_metadata",
    "export_hf",
    "extract_megatron",
    "hf_config_from_model_config",
    "import_hf",
    "load_joint_from_checkpoints",
    "model_config_from_hf",
    "read_model_metadata",
    "write_joint_checkpoint",
    "write_model_metadata",
]


def __getattr__(name: str):
    # The collective functions import megatron-core; keep `import megatron_wmss.interop` light.
    if name in ("export_hf", "extract_megatron", "import_hf"):
        from megatron_wmss.interop import convert

        return getattr(convert, name)
    if name in ("load_joint_from_checkpoints", "write_joint_checkpoint"):
        from megatron_wmss.interop import joint

        return getattr(joint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
