"""One optimizer step through megatron-core's pipeline schedule, for SFT and joint training.

Micro-batches are dicts with ``tokens`` ``[b, s]`` (int) and ``labels`` ``[b, s]`` (the token
each position predicts, ``-100`` where no loss is taken). The loss is the mean over every
supervised token of the global batch: micro-batches and data-parallel ranks are weighted by
their token counts (megatron's ``calculate_per_token_loss``), not averaged per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_wmss.data.collate import IGNORE_INDEX
from megatron_wmss.models import JointGPTModel
from megatron_wmss.platform import cuda_available, default_device
from megatron_wmss.training.setup import TrainingSetup

__all__ = ["StepMetrics", "batch_to_device", "causal_attention_mask", "train_step"]


@dataclass
class StepMetrics:
    """What one optimizer step reports, identical on every rank."""

    step: int
    loss: float  # mean per supervised token over the global batch (nats)
    num_tokens: int  # supervised tokens in the global batch
    grad_norm: float  # before clipping, over both models
    lr: float  # learning rate this step used (strong model)
    mix_lambda: float | None  # None for single-model SFT
    update_successful: bool


def causal_attention_mask(seq_len: int, device) -> torch.Tensor | None:
    """``[1, 1, s, s]`` bool, True above the diagonal (masked), or None where the attention
    kernel builds the causal mask itself (CUDA). Right padding needs no mask of its own: real
    tokens never attend to later positions, and padded positions carry no loss."""
    if cuda_available():
        return None
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu_(1)


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.to(torch.float32)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"loss_sum_and_tokens": report}


def batch_to_device(batch: dict, device) -> dict:
    """The micro-batch's tensors on ``device`` (loaders yield CPU tensors; pinned memory makes
    the copy asynchronous on CUDA)."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def _forward_step(data_iterator, model, *, seq_length: int):
    batch = batch_to_device(next(data_iterator), default_device())
    tokens, labels = batch["tokens"], batch["labels"]
    if tokens.shape != labels.shape or tokens.shape[1] != seq_length:
        raise ValueError(f"micro-batch tokens {tuple(tokens.shape)} and labels "
                         f"{tuple(labels.shape)} must both be [micro_batch_size, {seq_length}]")
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq_length, device=tokens.device).expand_as(tokens)
    mask = causal_attention_mask(seq_length, tokens.device)
    loss_mask = labels != IGNORE_INDEX
    output = model(tokens, position_ids, mask, labels=labels)
    return output, partial(_loss_func, loss_mask)


def _global_loss(reports) -> tuple[float, int]:
    """Sum (loss, tokens) over micro-batches, DP ranks, and out of the last pipeline stage."""
    device = torch.cuda.current_device() if cuda_available() else "cpu"
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for report in reports:
        totals += report["loss_sum_and_tokens"].to(torch.float64)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    return (loss_sum / tokens if tokens else math.nan), int(tokens)


def train_step(
    setup: TrainingSetup,
    data_iterator,
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
) -> StepMetrics:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``data_iterator`` yields this data-parallel rank's micro-batches (every pipeline stage of
    the rank reads the same ones). Sets λ from the mix schedule before the step.
    """
    model = setup.unwrapped
    joint = isinstance(model, JointGPTModel)
    mix_lambda = None
    if joint:
        mix_lambda = setup.mix.lambda_at(setup.step)
        model.set_mix_lambda(mix_lambda)
    for chunk in setup.model:
        chunk.zero_grad_buffer()
    setup.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, seq_length=seq_length),
        data_iterator=data_iterator,
        model=setup.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    lr = setup.optimizer.param_groups[0]["lr"]
    update_successful, grad_norm, _ = setup.optimizer.step()
    if update_successful:
        setup.scheduler.step(increment=1)
    loss, num_tokens = _global_loss(reports)
    metrics = StepMetrics(
        step=setup.step, loss=loss, num_tokens=num_tokens,
        grad_norm=float(grad_norm) if grad_norm is not None else math.nan, lr=float(lr),
        mix_lambda=mix_lambda, update_successful=bool(update_successful),
    )
    setup.step += 1
    return metrics
