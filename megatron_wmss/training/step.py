"""One optimizer step through megatron-core's pipeline schedule, for SFT and joint training.

Micro-batches are dicts with ``tokens`` ``[b, s]`` (int) and ``labels`` ``[b, s]`` (the token
each position predicts, ``-100`` where no loss is taken). The loss is the mean over every
supervised token of the global batch: micro-batches and data-parallel ranks are weighted by
their token counts (megatron's ``calculate_per_token_loss``), not averaged per micro-batch.

Without pipeline parallelism each micro-batch may have its own length; with it, every
micro-batch of the run must have the one ``seq_length`` the stages exchange. With sequence
parallelism a length must be a multiple of the tensor-parallel size (rows are split over it).

Packed micro-batches (they carry ``segment_ids`` and ``position_ids``,
:mod:`megatron_wmss.data.packing`) run with a block-diagonal causal mask and RoPE at each
token's own position under the local spec, and with packed-sequence parameters (THD, one row
per micro-batch, as in NeMo) under Transformer Engine.

A step whose loss or gradient norm is not finite is skipped: no update, no scheduler step,
the weights stay as they were (``StepMetrics.skipped``); the trainer counts them. ``setup.step``
counts iterations, skipped or not (the λ schedule follows it; the LR schedule counts updates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_wmss.data.packing import IGNORE_INDEX
from megatron_wmss.models import JointGPTModel
from megatron_wmss.platform import cuda_available, default_device
from megatron_wmss.training.grad_norms import UpdateNorm, per_model_grad_norms
from megatron_wmss.training.setup import TrainingSetup

__all__ = ["StepMetrics", "batch_to_device", "causal_attention_mask", "forward_backward",
           "train_step"]


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
    grad_norms: dict[str, float] = field(default_factory=dict)  # per model, before clipping
    skipped: bool = False  # non-finite loss or gradient norm: no update was made
    diagnostics: dict[str, float] = field(default_factory=dict)  # e.g. "strong/entropy"
    # "update_norm/strong", "param_norm/strong", "update_ratio/strong" ("…/model" for SFT):
    # ‖θ_after − θ_before‖, ‖θ_after‖ and their ratio, when the step was asked to measure them.
    update_norms: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # all tokens (padding excluded) the step processed, over all ranks


def causal_attention_mask(seq_len: int, device) -> torch.Tensor | None:
    """``[1, 1, s, s]`` bool, True above the diagonal (masked), or None where the attention
    kernel builds the causal mask itself (CUDA). Right padding needs no mask of its own: real
    tokens never attend to later positions, and padded positions carry no loss."""
    if cuda_available():
        return None
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu_(1)


def _loss_func(loss_mask: torch.Tensor, real_tokens: torch.Tensor,
               per_token_loss: torch.Tensor):
    mask = loss_mask.to(torch.float32)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum(), real_tokens])
    return loss_sum, num_tokens, {"loss_sum_and_tokens": report}


def batch_to_device(batch: dict, device) -> dict:
    """The micro-batch's tensors on ``device`` (loaders yield CPU tensors; pinned memory makes
    the copy asynchronous on CUDA)."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def _forward_step(data_iterator, model, *, seq_length: Optional[int]):
    host_batch = next(data_iterator)
    _check_labels_on_host(model, host_batch["labels"])
    batch = batch_to_device(host_batch, default_device())
    tokens, labels = batch["tokens"], batch["labels"]
    length = tokens.shape[1]
    if tokens.shape != labels.shape or (seq_length is not None and length != seq_length):
        want = seq_length if seq_length is not None else "s"
        raise ValueError(f"micro-batch tokens {tuple(tokens.shape)} and labels "
                         f"{tuple(labels.shape)} must both be [micro_batch_size, {want}]")
    _check_sequence_split(model, length)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=tokens.device).expand_as(tokens)
    packed = {}
    if "segment_ids" in batch:
        mask, packed = _packed_inputs(model, host_batch["segment_ids"], tokens.device)
    else:
        mask = causal_attention_mask(length, tokens.device)
    loss_mask = labels != IGNORE_INDEX
    real = batch.get("attention_mask")
    real_tokens = (real.sum() if real is not None else torch.tensor(tokens.numel())).to(
        device=tokens.device, dtype=torch.float32)
    output = model(tokens, position_ids, mask, labels=labels, **packed)
    return output, partial(_loss_func, loss_mask, real_tokens)


def _check_sequence_split(model, length: int) -> None:
    """Sequence parallelism splits each row over the tensor-parallel ranks."""
    from megatron.core.utils import get_attr_wrapped_model

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if get_attr_wrapped_model(model, "config").sequence_parallel and length % tp:
        raise ValueError(f"micro-batch length {length} must be a multiple of "
                         f"tensor_model_parallel_size={tp} with sequence_parallel (pad rows to "
                         f"a multiple of it: data.pad_to_multiple_of)")


def _check_labels_on_host(model, labels) -> None:
    """Every target id inside the model's real vocabulary, read where the loader made the
    labels (the CPU): the loss on an accelerator only asserts it asynchronously."""
    from megatron.core.utils import get_attr_wrapped_model

    vocab = get_attr_wrapped_model(model, "real_vocab_size")
    if vocab is None or not isinstance(labels, torch.Tensor) or labels.device.type != "cpu":
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"micro-batch labels[{row}, {col}] = {int(labels[row, col])} lies "
                         f"outside the model's vocabulary [0, {vocab}); positions without a "
                         f"target take {IGNORE_INDEX}")


def _packed_inputs(model, segment_ids: torch.Tensor,
                   device) -> tuple[Optional[torch.Tensor], dict]:
    """(attention mask, model kwargs) for packed rows; ``segment_ids`` as the loader gave them
    (on the host: THD's sequence lengths are read there, without a device sync)."""
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_wmss.data.packing import packed_attention_mask, packed_seq_params

    if get_attr_wrapped_model(model, "uses_te"):
        if segment_ids.shape[0] != 1:
            raise ValueError(f"packed micro-batches under Transformer Engine hold one row "
                             f"(THD), got {segment_ids.shape[0]}; set micro_batch_size: 1")
        return None, {"packed_seq_params": packed_seq_params(segment_ids, device=device)}
    if get_attr_wrapped_model(model, "config").masked_softmax_fusion:
        raise ValueError("packed rows need the attention mask, which the fused causal softmax "
                         "kernel ignores; use the Transformer Engine spec or "
                         "masked_softmax_fusion=False")
    return packed_attention_mask(segment_ids.to(device)), {"rope_positions": True}


def _global_sums(reports) -> tuple[float, int, int]:
    """(loss, supervised tokens, tokens) summed over micro-batches, DP ranks and out of the last
    pipeline stage; the loss is the mean per supervised token."""
    device = torch.cuda.current_device() if cuda_available() else "cpu"
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for report in reports:
        totals += report["loss_sum_and_tokens"].to(torch.float64)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, supervised, tokens = totals.tolist()
    return (loss_sum / supervised if supervised else math.nan), int(supervised), int(tokens)


def forward_backward(setup: TrainingSetup, data_iterator, *, num_microbatches: int,
                     micro_batch_size: int, seq_length: Optional[int] = None,
                     diagnostics: bool = False) -> tuple[float, int, int, dict]:
    """Forward and backward over the micro-batches, gradients reduced and scaled by the global
    supervised-token count (in the DDP grad buffers: ``param.main_grad``), no optimizer step.

    Returns (loss, supervised tokens, tokens, diagnostics) over the global batch.
    """
    model = setup.unwrapped
    joint = isinstance(model, JointGPTModel)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1 and seq_length is None:
        raise ValueError("seq_length is required with pipeline parallelism (stages exchange "
                         "[seq_length, micro_batch_size, hidden] activations)")
    if joint:
        model.set_mix_lambda(setup.mix.lambda_at(setup.step))
    model.record_diagnostics(diagnostics)
    for chunk in setup.model:
        chunk.zero_grad_buffer()
    setup.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, seq_length=seq_length if pp > 1 else None),
        data_iterator=data_iterator,
        model=setup.model,
        num_microbatches=num_microbatches,
        # PP=1 never sizes a buffer from it; each micro-batch brings its own length.
        seq_length=seq_length or 0,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss, supervised, tokens = _global_sums(reports)
    stats = model.pop_diagnostics() if diagnostics else {}
    return loss, supervised, tokens, stats


def _optimizer_step(setup: TrainingSetup, loss: float, update_norm: bool = False
                    ) -> tuple[bool, float, dict[str, float], dict[str, float]]:
    """Clip and step unless the loss or the gradient norm is non-finite.

    Returns (stepped, total grad norm, per-model grad norms, update norms), grad norms before
    clipping; update norms (:class:`UpdateNorm`) only with ``update_norm`` and a step made.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer = setup.optimizer
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    norms = per_model_grad_norms(setup)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False, grad_norm, norms, {}
    clip = optimizer.config.clip_grad
    if clip > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip, grad_norm)
    measure = UpdateNorm(setup) if update_norm else None
    stepped = bool(optimizer.step_with_ready_grads())
    updates = measure.finish() if measure is not None and stepped else {}
    return stepped, grad_norm, norms, updates


def train_step(
    setup: TrainingSetup,
    data_iterator,
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: Optional[int] = None,
    diagnostics: bool = False,
    update_norm: bool = False,
) -> StepMetrics:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``data_iterator`` yields this data-parallel rank's micro-batches (every pipeline stage of
    the rank reads the same ones). Sets λ from the mix schedule before the step. With
    ``diagnostics`` a joint model also reports the saturation statistics of the strong, weak
    and mixed distributions, an SFT model those of its own (``model/<field>``; token means
    over the global batch). With ``update_norm`` it also measures how far the step moved the
    strong (or only) model (``StepMetrics.update_norms``; a copy of its main parameters is held
    during the optimizer step).
    """
    joint = isinstance(setup.unwrapped, JointGPTModel)
    mix_lambda = setup.mix.lambda_at(setup.step) if joint else None
    loss, supervised, tokens, stats = forward_backward(
        setup, data_iterator, num_microbatches=num_microbatches,
        micro_batch_size=micro_batch_size, seq_length=seq_length, diagnostics=diagnostics)
    lr = setup.strong_lr()
    stepped, grad_norm, norms, updates = _optimizer_step(setup, loss, update_norm)
    if stepped:
        setup.scheduler.step(increment=1)
    metrics = StepMetrics(
        step=setup.step, loss=loss, num_tokens=supervised, grad_norm=grad_norm, lr=float(lr),
        mix_lambda=mix_lambda, update_successful=stepped, grad_norms=norms,
        skipped=not stepped, diagnostics=stats, tokens=tokens, update_norms=updates,
    )
    setup.step += 1  # iterations: a skipped step still consumed its batch
    return metrics
