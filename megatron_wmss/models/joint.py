"""The joint strong/weak model: two ``GPTModel``s with one layout and one mixed loss.

Each pipeline stage holds the same layer range of both models. Between stages their hidden
states travel as one tensor ``[s, b, h_strong + h_weak]`` (concatenated on the hidden
dimension), so megatron-core's non-interleaved pipeline schedule runs the pair unchanged: the
joint model's ``config.hidden_size`` is the sum, which is what the schedule sizes its p2p
buffers from. The last stage runs both output layers and the vocab-parallel mixed
cross-entropy on the two models' logit shards, or, with ``set_cross_entropy("chunked")``,
the chunked linear mixed cross-entropy on both models' final hidden states and output weights
(no logits tensor at all). Under sequence parallelism both models' hidden states (and the
activations between stages) are ``[s/tp, b, h]`` slices; the chunked loss gathers them along
the sequence and reduce-scatters their gradients, as megatron's output layer does.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_wmss.loss import (
    linear_mixed_cross_entropy,
    mixed_cross_entropy,
    mixed_logit_diagnostics,
)
from megatron_wmss.loss.linear_cross_entropy import gather_sequence_parallel
from megatron_wmss.loss.vocab_parallel import check_mix_lambda

__all__ = ["DIAGNOSTIC_FIELDS", "JointGPTModel", "finalize_joint_model_grads"]

#: Saturation statistics reported per distribution (strong, weak, mixed), token means.
DIAGNOSTIC_FIELDS = ("entropy", "target_prob", "margin", "logit_std")
_DISTRIBUTIONS = ("strong", "weak", "mixed")
_DIAGNOSTIC_LOGITS = 1 << 24  # fp32 logits per chunk of the chunked diagnostics: 64 MiB


class JointGPTModel(MegatronModule):
    """Strong and weak ``GPTModel`` of one pipeline stage, trained on ``CE(λ·z_s + (1−λ)·z_w)``.

    ``forward`` returns what megatron's schedule expects: the concatenated hidden states on
    inner stages, the per-token mixed loss ``[b, s]`` (fp32, over the real vocabulary of
    ``real_vocab_size`` columns, ``-100`` labels ignored) on the last stage when ``labels``
    are given, or both models' logit shards ``([b, s, v], [b, s, v])`` when they are not.
    With ``freeze_weak`` the weak model runs without autograd and holds no trainable parameter.
    """

    def __init__(self, strong, weak, mix_lambda: float = 0.5, freeze_weak: bool = False,
                 tp_group: Optional[dist.ProcessGroup] = None):
        if (strong.pre_process, strong.post_process) != (weak.pre_process, weak.post_process):
            raise ValueError("strong and weak models must hold the same pipeline stage")
        if strong.vocab_size != weak.vocab_size:
            raise ValueError(f"strong and weak models differ in padded vocab size: "
                             f"{strong.vocab_size} vs {weak.vocab_size}")
        # The real (unpadded) vocabulary the loss softmaxes over; None: every column is real.
        real_vocab = getattr(strong, "real_vocab_size", None)
        if real_vocab != getattr(weak, "real_vocab_size", None):
            raise ValueError(f"strong and weak models differ in real vocab size: {real_vocab} "
                             f"vs {getattr(weak, 'real_vocab_size', None)}")
        config = copy.copy(strong.config)
        # The schedule sizes p2p buffers from config.hidden_size: both activations travel.
        config.hidden_size = strong.config.hidden_size + weak.config.hidden_size
        super().__init__(config=config)
        self.strong, self.weak = strong, weak
        self.strong_hidden_size = strong.config.hidden_size
        self.pre_process, self.post_process = strong.pre_process, strong.post_process
        self.model_type = strong.model_type
        self.uses_te = getattr(strong, "uses_te", False)
        # Tied embeddings are reduced across stages by finalize_joint_model_grads for both
        # models; megatron's own reduction looks for a single shared weight and must skip us.
        self.share_embeddings_and_output_weights = False
        self.real_vocab_size = real_vocab
        self.mix_lambda = check_mix_lambda(mix_lambda)
        self.freeze_weak = freeze_weak
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        if freeze_weak:
            self.weak.requires_grad_(False)
        self._diagnostics_on = False
        self._diagnostic_sums = None  # [3 distributions x 4 fields + 1 token count], fp64

    def record_diagnostics(self, enabled: bool) -> None:
        """Accumulate the saturation statistics over the following forward passes (costs one
        MAX and one SUM all-reduce over the tensor-parallel group per micro-batch)."""
        self._diagnostics_on = bool(enabled)
        self._diagnostic_sums = None

    def pop_diagnostics(self) -> dict[str, float]:
        """Token means since :meth:`record_diagnostics` over the global batch, keyed
        ``"<strong|weak|mixed>/<field>"`` (collective over data- and pipeline-parallel
        groups: only the last stage holds statistics). Stops recording."""
        from megatron_wmss.platform import default_device

        sums = self._diagnostic_sums
        if sums is None:
            sums = torch.zeros(len(_DISTRIBUTIONS) * len(DIAGNOSTIC_FIELDS) + 1,
                               dtype=torch.float64, device=default_device())
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        self.record_diagnostics(False)
        count = float(sums[-1])
        keys = [f"{d}/{f}" for d in _DISTRIBUTIONS for f in DIAGNOSTIC_FIELDS]
        return {key: float(value) / count if count else float("nan")
                for key, value in zip(keys, sums[:-1].tolist())}

    def _accumulate_diagnostics(self, strong_out, weak_out, labels) -> None:
        stats = mixed_logit_diagnostics(strong_out.detach(), weak_out.detach(), labels,
                                        self.mix_lambda, tp_group=self.tp_group,
                                        vocab_size=self.real_vocab_size)
        parts = [getattr(stats[d], f).sum() for d in _DISTRIBUTIONS for f in DIAGNOSTIC_FIELDS]
        parts.append(stats["strong"].valid.sum())
        sums = torch.stack([p.to(torch.float64) for p in parts])
        self._diagnostic_sums = sums if self._diagnostic_sums is None else \
            self._diagnostic_sums + sums

    def set_cross_entropy(self, impl: str, chunk_tokens: Optional[int] = None) -> None:
        """Both models' :meth:`WMSSGPTModel.set_cross_entropy`: ``chunked`` computes the mixed
        loss from the two models' final hidden states and output weights, with no logits."""
        self.strong.set_cross_entropy(impl, chunk_tokens)
        self.weak.set_cross_entropy(impl, chunk_tokens)

    def _accumulate_chunked_diagnostics(self, hidden_s, hidden_w, labels_t) -> None:
        """The diagnostics of the chunked path: whole-vocabulary logits made a chunk of tokens
        at a time (at most the loss's chunk, and about 16M logits of the shard)."""
        weight_s, weight_w = self.strong.output_weight(), self.weak.output_weight()
        hidden_s, hidden_w = hidden_s.detach(), hidden_w.detach()
        if self.config.sequence_parallel:  # [s/tp, b, h] slices: the whole sequence
            hidden_s = gather_sequence_parallel(hidden_s, self.tp_group)
            hidden_w = gather_sequence_parallel(hidden_w, self.tp_group)
        hidden_s = hidden_s.reshape(-1, hidden_s.shape[-1])
        hidden_w = hidden_w.reshape(-1, hidden_w.shape[-1])
        chunk = max(1, _DIAGNOSTIC_LOGITS // weight_s.shape[0])
        chunk = min(chunk, self.strong.cross_entropy_chunk or chunk)
        with torch.no_grad():
            for start in range(0, labels_t.numel(), chunk):
                rows = slice(start, start + chunk)
                self._accumulate_diagnostics(hidden_s[rows] @ weight_s.detach().t(),
                                             hidden_w[rows] @ weight_w.detach().t(),
                                             labels_t[rows])

    def set_mix_lambda(self, mix_lambda: float) -> None:
        """Set λ for the following forward passes (the optional linear ramp calls this)."""
        self.mix_lambda = check_mix_lambda(mix_lambda)

    def set_input_tensor(self, input_tensor) -> None:
        """Split the tensor received from the previous stage into the two models' inputs."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.strong.set_input_tensor(None)
            self.weak.set_input_tensor(None)
            return
        # Slices of the hidden dim are strided views; Transformer Engine's kernels want
        # contiguous inputs. The copies stay in the autograd graph, so the received tensor
        # still gets its gradient for the previous stage.
        h = self.strong_hidden_size
        self.strong.set_input_tensor(input_tensor[..., :h].contiguous())
        self.weak.set_input_tensor(input_tensor[..., h:].contiguous())

    def _weak_context(self):
        return torch.no_grad() if self.freeze_weak else contextlib.nullcontext()

    def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
        """``kwargs`` (``rope_positions``, ``packed_seq_params``) reach both models."""
        if labels is not None and self.post_process and \
                self.strong.cross_entropy_impl == "chunked":
            return self._chunked_loss(input_ids, position_ids, attention_mask, labels, **kwargs)
        strong_out = self.strong(input_ids, position_ids, attention_mask, **kwargs)
        with self._weak_context():
            weak_out = self.weak(input_ids, position_ids, attention_mask, **kwargs)
        if not self.post_process:
            return torch.cat([strong_out, weak_out], dim=-1)
        if labels is None:
            return strong_out, weak_out
        if self._diagnostics_on:
            self._accumulate_diagnostics(strong_out, weak_out, labels)
        return mixed_cross_entropy(strong_out, weak_out, labels, self.mix_lambda,
                                   tp_group=self.tp_group, vocab_size=self.real_vocab_size)

    def _chunked_loss(self, input_ids, position_ids, attention_mask, labels, **kwargs):
        hidden_s = self.strong.final_hidden_states(input_ids, position_ids, attention_mask,
                                                   **kwargs)
        with self._weak_context():
            hidden_w = self.weak.final_hidden_states(input_ids, position_ids, attention_mask,
                                                     **kwargs)
        # Hidden states are [s, b, h] ([s/tp, b, h] under sequence parallelism: the loss
        # gathers them); labels cover the whole sequence on every rank.
        labels_sb = labels.transpose(0, 1)
        if self._diagnostics_on:
            self._accumulate_chunked_diagnostics(hidden_s, hidden_w, labels_sb.reshape(-1))
        loss_sb = linear_mixed_cross_entropy(
            hidden_s, hidden_w, self.strong.output_weight(), self.weak.output_weight(),
            labels_sb, self.mix_lambda, tp_group=self.tp_group, vocab_size=self.real_vocab_size,
            chunk_size=self.strong.cross_entropy_chunk,
            sequence_parallel=self.config.sequence_parallel)
        return loss_sb.transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Both models' megatron sharded state dicts under ``strong.`` and ``weak.``."""
        out = dict(self.strong.sharded_state_dict(f"{prefix}strong.", sharded_offsets, metadata))
        out.update(self.weak.sharded_state_dict(f"{prefix}weak.", sharded_offsets, metadata))
        return out


def _tied_embedding_weights(joint: JointGPTModel):
    for model in (joint.strong, joint.weak):
        if model.share_embeddings_and_output_weights:
            weight = model.shared_embedding_or_output_weight()
            if weight is not None and weight.requires_grad:
                yield weight


def finalize_joint_model_grads(model_chunks, num_tokens=None, **kwargs) -> None:
    """megatron's ``finalize_model_grads`` plus the tied-embedding reduction of both models.

    With pipeline parallelism and tied embeddings, the first stage's input embedding and the
    last stage's output layer are copies of one weight; their gradients are summed over the
    embedding group, for the strong and the weak model alike.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_attr_wrapped_model

    finalize_model_grads(model_chunks, num_tokens, **kwargs)
    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group=group) == 1:
        return
    if dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    chunk = model_chunks[0] if parallel_state.is_pipeline_first_stage() else model_chunks[-1]
    joint = get_attr_wrapped_model(chunk, "strong", return_model_obj=True)
    for weight in _tied_embedding_weights(joint):
        grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
        if grad is not None:
            dist.all_reduce(grad, group=group)
