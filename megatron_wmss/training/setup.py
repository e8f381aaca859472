"""Assemble what a training run holds: DDP-wrapped model, megatron optimizer, LR schedule.

One function for both paths: plain SFT of one model (phase 1) and joint strong/weak training
(phase 3). Call after megatron's parallel state is initialized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_wmss.config import (
    MemoryConfig,
    MixConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SFTLossConfig,
    check_same_architecture,
)
from megatron_wmss.models import JointGPTModel, build_gpt_model, finalize_joint_model_grads
from megatron_wmss.platform import apply_cpu_shims, cuda_available
from megatron_wmss.platform.distrib_optimizer import apply_distributed_optimizer_fix
from megatron_wmss.models.checkpoint import load_model_checkpoint

__all__ = ["TrainingSetup", "is_weak_param", "setup_training"]


@dataclass
class TrainingSetup:
    """Everything ``train_step`` needs; ``mix`` is None for single-model SFT."""

    model: list  # megatron-DDP-wrapped model chunks (one: no virtual pipeline)
    optimizer: object  # megatron MegatronOptimizer
    scheduler: object  # megatron OptimizerParamScheduler
    mix: Optional[MixConfig]
    memory: Optional[MemoryConfig] = None  # resolved: no null (auto) settings left
    step: int = 0
    max_lr: float = 0.0  # the strong model's peak lr: finds its param groups for logging

    def strong_lr(self) -> float:
        """The learning rate the strong (or only) model's parameters use now."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("max_lr") == self.max_lr), groups[0]["lr"])

    @property
    def unwrapped(self):
        """The model inside DDP: a ``JointGPTModel`` or a ``GPTModel``."""
        return self.model[0].module

    def load_weights(self, directory, prefix: str = "") -> None:
        """Collectively load model weights from a checkpoint of any layout (see
        :func:`~megatron_wmss.models.checkpoint.load_model_checkpoint`), then refresh the
        optimizer's copies of them."""
        load_model_checkpoint(self.model[0], directory, prefix)
        self.weights_changed()

    def weights_changed(self) -> None:
        """Call after weights were changed outside the optimizer (e.g. by
        ``interop.load_joint_from_checkpoints``): with bf16 parameters the optimizer keeps fp32
        main copies, which would otherwise still hold the old weights and overwrite the new
        ones at the next step."""
        self.optimizer.reload_model_params()


def is_weak_param(name: str) -> bool:
    """True for parameters of the weak model of a joint model (``[module.]weak.…``)."""
    return ".weak." in f".{name}"


def warmup_steps(fraction: float, total_steps: int) -> int:
    """Linear warm-up steps for ``fraction`` of ``total_steps``, rounded up: a non-zero
    fraction never rounds to no warm-up (10% of 5 steps is 1 step, not 0)."""
    return math.ceil(fraction * total_steps) if fraction > 0 else 0


def _optimizer(chunks, cfg: ModelConfig, optim: OptimConfig, total_steps: int,
               distributed: bool):
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    bf16 = cfg.params_dtype == "bfloat16"
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    overrides = get_standard_config_overrides(opt_cfg)
    if optim.weak_lr is not None:
        weak = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="weak_model", fn=lambda param, name: is_weak_param(name)))
        overrides[weak] = {"max_lr": optim.weak_lr,
                           "min_lr": optim.min_lr * optim.weak_lr_mult}
    optimizer = get_megatron_optimizer(opt_cfg, chunks, config_overrides=overrides)
    return optimizer, build_scheduler(optimizer, optim, total_steps)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """megatron's OptimizerParamScheduler for ``optim`` over ``total_steps`` optimizer steps:
    linear warm-up from 0 over ``warmup_steps``, then ``optim.lr_schedule`` down to min_lr at
    the last step (a group's own max_lr/min_lr, e.g. the weak model's, take precedence)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = warmup_steps(optim.warmup_fraction, total_steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=optim.lr_schedule, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )


def _check_joint(strong: ModelConfig, weak: ModelConfig, mix: MixConfig,
                 optim: OptimConfig) -> None:
    check_same_architecture(strong, weak)
    if weak.params_dtype != strong.params_dtype:
        # One optimizer and one pipeline p2p dtype serve both models.
        raise ValueError(f"strong and weak models differ in params_dtype: strong="
                         f"{strong.params_dtype!r}, weak={weak.params_dtype!r}")
    if mix.freeze_weak and optim.weak_lr is not None:
        raise ValueError(f"OptimConfig.weak_lr={optim.weak_lr} has no effect with "
                         "MixConfig.freeze_weak=True; unset one of them")


def setup_training(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    total_steps: int,
    mix: Optional[MixConfig] = None,
    weak_cfg: Optional[ModelConfig] = None,
    seed: int = 1234,
    memory: Optional[MemoryConfig] = None,
    sft_loss: Optional[SFTLossConfig] = None,
) -> TrainingSetup:
    """Build the model(s) for this rank's stage, wrap in megatron DDP, build optimizer/schedule.

    ``mix=None`` gives plain SFT of one model; otherwise a :class:`JointGPTModel` whose weak
    model uses ``weak_cfg`` (default: ``model_cfg``). Weights are freshly initialized from
    ``seed``; load checkpoints afterwards to start from trained models. ``memory`` chooses
    the distributed optimizer, communication overlap and activation recomputation (default:
    :class:`MemoryConfig`'s automatic choices for this machine).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if mix is not None:
        weak_cfg = weak_cfg or model_cfg
        _check_joint(model_cfg, weak_cfg, mix, optim)
    apply_cpu_shims()  # no-op on CUDA; lets torchrun-launched CPU runs use megatron-core
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size):
        raise ValueError(f"ParallelConfig says tp={parallel.tensor_model_parallel_size}, "
                         f"pp={parallel.pipeline_model_parallel_size} but megatron's parallel "
                         f"state was initialized with tp={tp}, pp={pp}")
    memory = (memory or MemoryConfig()).resolved(cuda_available())
    if memory.distributed_optimizer:
        apply_distributed_optimizer_fix()  # no-op where TE/Apex provide FusedAdam
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = build_gpt_model(model_cfg, parallel, recompute=memory.recompute)
    if mix is not None:
        weak = build_gpt_model(weak_cfg, parallel, recompute=memory.recompute)
        model = JointGPTModel(model, weak, mix.lambda_at(0), freeze_weak=mix.freeze_weak)
    model.set_cross_entropy(memory.cross_entropy_impl, memory.cross_entropy_chunk_tokens)
    if sft_loss is not None and not sft_loss.plain:
        if mix is not None:
            raise ValueError("sft_loss (logit_scale, label_smoothing) applies to SFT; a joint "
                             "run's loss is the mixed cross-entropy")
        model.set_sft_loss(sft_loss.logit_scale, sft_loss.label_smoothing)

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=memory.overlap_grad_reduce,
            use_distributed_optimizer=memory.distributed_optimizer,
            overlap_param_gather=memory.overlap_param_gather),
        module=model,
    )
    chunks = [ddp]
    optimizer, scheduler = _optimizer(chunks, model_cfg, optim, total_steps,
                                      memory.distributed_optimizer)
    config = model.config  # the object megatron's schedule reads (DDP shares it)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = (
        finalize_joint_model_grads if mix is not None else finalize_model_grads)
    config.grad_scale_func = optimizer.scale_loss
    return TrainingSetup(model=chunks, optimizer=optimizer, scheduler=scheduler, mix=mix,
                         memory=memory, max_lr=optim.lr)

