"""Training configuration: the strong/weak mix, the optimizer and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["RECOMPUTE", "MemoryConfig", "MixConfig", "OptimConfig", "SFTLossConfig"]

#: Activation recomputation: none, selective (core attention), full (every layer).
RECOMPUTE = ("none", "selective", "full")
#: MemoryConfig.cross_entropy_impl choices (megatron_wmss.models.gpt.WMSSGPTModel).
CROSS_ENTROPY_IMPLS = ("unfused", "chunked")


def _in_unit_interval(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1], got {value!r}")


@dataclass
class MixConfig:
    """How the strong and weak logits are mixed: ``λ·z_strong + (1−λ)·z_weak`` (WMSS §3)."""

    mix_lambda: float = 0.5
    """Weight λ of the strong model (paper default 0.5; best 0.42, plateau [0.42, 0.50])."""
    lambda_start: Optional[float] = None
    """With ``lambda_ramp_steps`` > 0: λ at step 0, moved linearly to ``mix_lambda``."""
    lambda_ramp_steps: int = 0
    """Optimizer steps of the linear ramp from ``lambda_start`` to ``mix_lambda``; 0 = constant."""
    freeze_weak: bool = False
    """Keep the weak model fixed (paper App. B ablation; the main results train both)."""

    def __post_init__(self) -> None:
        _in_unit_interval("MixConfig", "mix_lambda", self.mix_lambda)
        if isinstance(self.lambda_ramp_steps, bool) or not isinstance(self.lambda_ramp_steps, int) \
                or self.lambda_ramp_steps < 0:
            raise ValueError("MixConfig.lambda_ramp_steps must be an int >= 0, got "
                             f"{self.lambda_ramp_steps!r}")
        if self.lambda_ramp_steps and self.lambda_start is None:
            raise ValueError("MixConfig.lambda_start is required when lambda_ramp_steps > 0")
        if not self.lambda_ramp_steps and self.lambda_start is not None:
            raise ValueError("MixConfig.lambda_start has no effect without lambda_ramp_steps > 0")
        if self.lambda_start is not None:
            _in_unit_interval("MixConfig", "lambda_start", self.lambda_start)

    def lambda_at(self, step: int) -> float:
        """λ for optimizer step ``step`` (0-based): the linear ramp, then ``mix_lambda``."""
        if not self.lambda_ramp_steps or step >= self.lambda_ramp_steps:
            return float(self.mix_lambda)
        frac = step / self.lambda_ramp_steps
        return float(self.lambda_start + frac * (self.mix_lambda - self.lambda_start))


@dataclass
class SFTLossConfig:
    """Single-model (SFT) loss variants, the controls of ``wmss run --ablations``; the
    defaults are plain cross-entropy."""

    logit_scale: float = 1.0
    """Train on CE(s·z): the "temperature control", CE(λ·z_strong) with no weak model (what
    the mixed loss becomes when the weak logits are uniform); in (0, 1]."""
    label_smoothing: float = 0.0
    """ε of label smoothing over the real vocabulary, in [0, 1)."""

    def __post_init__(self) -> None:
        if isinstance(self.logit_scale, bool) or not isinstance(self.logit_scale, (int, float)) \
                or not 0.0 < self.logit_scale <= 1.0:
            raise ValueError(f"SFTLossConfig.logit_scale must be in (0, 1], got "
                             f"{self.logit_scale!r}")
        if isinstance(self.label_smoothing, bool) or \
                not isinstance(self.label_smoothing, (int, float)) or \
                not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"SFTLossConfig.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing!r}")

    @property
    def plain(self) -> bool:
        return self.logit_scale == 1.0 and self.label_smoothing == 0.0


#: OptimConfig.lr_schedule: the shape after warm-up (megatron's OptimizerParamScheduler styles).
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine, linear or constant learning rate (paper App. E:
    10% warm-up; the authors' scripts: linear decay, no warm-up)."""

    lr: float = 1e-5
    """Peak learning rate of the strong model (paper: 1e-5)."""
    weak_lr: Optional[float] = None
    """Peak learning rate of the weak model; None means the same as ``lr``."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay (scaled by weak_lr/lr for the weak model)."""
    lr_schedule: str = "cosine"
    """After warm-up: cosine or linear (decay to min_lr at the last step; linear with min_lr 0
    is transformers' get_linear_schedule_with_warmup step for step) or constant."""
    warmup_fraction: float = 0.1
    """Fraction of the optimizer steps spent in linear warm-up from 0 (paper: 10%)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (biases and norms are exempt)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip over both models (0 disables)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.weak_lr is not None and not self.weak_lr > 0:
            raise ValueError(f"OptimConfig.weak_lr must be > 0 or null, got {self.weak_lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"OptimConfig.lr_schedule must be one of {list(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("OptimConfig.warmup_fraction must be in [0, 1), got "
                             f"{self.warmup_fraction}")
        if not self.adam_eps > 0:
            # eps = 0 turns an exactly-zero gradient (the weak model at λ=1) into NaN.
            raise ValueError(f"OptimConfig.adam_eps must be > 0, got {self.adam_eps}")
        for name in ("weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")

    @property
    def weak_lr_mult(self) -> float:
        """Ratio of the weak model's learning rate to the strong model's."""
        return 1.0 if self.weak_lr is None else self.weak_lr / self.lr


@dataclass
class MemoryConfig:
    """Memory features: sharded optimizer state and activation recomputation."""

    distributed_optimizer: Optional[bool] = None
    """Shard fp32 master weights and Adam moments over data-parallel ranks (megatron's
    distributed optimizer, ZeRO-1); null: on with CUDA, off on CPU."""
    overlap_grad_reduce: Optional[bool] = None
    """Overlap the gradient reduce(-scatter) with backward; null: on with CUDA."""
    overlap_param_gather: Optional[bool] = None
    """Distributed optimizer: overlap the parameter all-gather with the next forward; null: on
    with CUDA."""
    recompute: str = "none"
    """Activation recomputation: none | selective (core attention) | full (every layer)."""
    cross_entropy_impl: Optional[str] = None
    """How SFT's and the joint run's loss meet the output layer: unfused (the output layer
    makes the [s, b, v] logits, then the loss) | chunked (the loss straight from the final
    hidden states and output weights, a tile of tokens × vocab at a time: no logits tensor);
    null: chunked, measured faster and ~1/80 the loss memory (README, bench/run.py). With
    sequence parallelism both gather the hidden states along the sequence first."""
    cross_entropy_chunk_tokens: Optional[int] = None
    """Tokens per chunk of the chunked loss; null: 2048 (each chunk's logits are then made
    in vocab blocks of ~1M logits, a 4 MiB fp32 tile)."""

    def __post_init__(self) -> None:
        if self.cross_entropy_impl is not None and \
                self.cross_entropy_impl not in CROSS_ENTROPY_IMPLS:
            raise ValueError(f"memory.cross_entropy_impl must be one of "
                             f"{list(CROSS_ENTROPY_IMPLS)}, got {self.cross_entropy_impl!r}")
        chunk = self.cross_entropy_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                  or chunk < 1):
            raise ValueError(f"memory.cross_entropy_chunk_tokens must be a positive int or "
                             f"null, got {chunk!r}")
        for name in ("distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"memory.{name} must be true, false or null (auto), got "
                                 f"{value!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"memory.recompute must be one of {list(RECOMPUTE)}, got "
                             f"{self.recompute!r}")

    def resolved(self, cuda: bool) -> "MemoryConfig":
        """A copy with every null (auto) setting decided for this machine."""
        dist_opt = cuda if self.distributed_optimizer is None else self.distributed_optimizer
        if self.overlap_param_gather and not dist_opt:
            raise ValueError("memory.overlap_param_gather=true needs the distributed optimizer "
                             "(memory.distributed_optimizer=true; its default is on with CUDA "
                             "only)")
        return dataclasses.replace(
            self, distributed_optimizer=dist_opt,
            overlap_grad_reduce=cuda if self.overlap_grad_reduce is None
            else self.overlap_grad_reduce,
            overlap_param_gather=(cuda and dist_opt) if self.overlap_param_gather is None
            else self.overlap_param_gather,
            cross_entropy_impl=self.cross_entropy_impl or "chunked")
