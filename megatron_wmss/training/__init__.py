"""Training: model/optimizer assembly and the train step shared by SFT and joint training."""

from megatron_wmss.training.setup import TrainingSetup, is_weak_param, setup_training
from megatron_wmss.training.step import (
    StepMetrics,
    batch_to_device,
    causal_attention_mask,
    train_step,
)

__all__ = [
    "StepMetrics",
    "TrainingSetup",
    "batch_to_device",
    "causal_attention_mask",
    "is_weak_param",
    "setup_training",
    "train_step",
]
