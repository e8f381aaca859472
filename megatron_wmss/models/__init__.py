"""Models: megatron-core ``GPTModel`` construction and the joint strong/weak model."""

from megatron_wmss.models.builder import (
    SequenceParallelRMSNorm,
    build_gpt_model,
    layer_spec,
    transformer_config,
    transformer_config_kwargs,
    use_transformer_engine,
)
from megatron_wmss.models.gpt import WMSSGPTModel
from megatron_wmss.models.joint import JointGPTModel, finalize_joint_model_grads

__all__ = [
    "JointGPTModel",
    "SequenceParallelRMSNorm",
    "WMSSGPTModel",
    "build_gpt_model",
    "finalize_joint_model_grads",
    "layer_spec",
    "transformer_config",
    "transformer_config_kwargs",
    "use_transformer_engine",
]
