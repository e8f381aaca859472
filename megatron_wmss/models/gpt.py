"""megatron-core's ``GPTModel`` with its language-model loss taken over the real vocabulary.

megatron pads the vocabulary to a multiple of 128·TP, and its own cross-entropy softmaxes over
every padded column too (logit 0 for an imported model), so the objective would change with TP
and differ from the exported model's. This subclass changes only the loss: the same layers,
state-dict keys and checkpoints as ``GPTModel``.

Padded rows of the embedding and output layer start at zero (an imported model's are zero
too) and stay zero: their logits are outside the softmax, so their gradient is exactly zero,
no real token looks them up, and weight decay keeps a zero at zero.

Packed rows (:mod:`megatron_wmss.data.packing`) under the local layer spec: ``forward`` and
``final_hidden_states`` take ``rope_positions=True`` to rotate each token by its own
``position_ids`` (positions restart per sample) instead of by its place in the row; the
attention mask confines each sample to itself. Transformer Engine restarts positions from the
packed-sequence parameters (THD) itself.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_wmss.config.training import CROSS_ENTROPY_IMPLS
from megatron_wmss.loss import cross_entropy, linear_cross_entropy
from megatron_wmss.loss.linear_cross_entropy import gather_sequence_parallel
from megatron_wmss.loss.smoothing import smoothing_term, smoothing_term_from_hidden
from megatron_wmss.loss.vocab_parallel import real_columns_in_shard

__all__ = ["WMSSGPTModel"]


class WMSSGPTModel(GPTModel):
    """``GPTModel`` whose loss is :func:`megatron_wmss.loss.cross_entropy` with
    ``vocab_size=real_vocab_size`` (fp32, padded columns outside the softmax, labels equal to
    ``ignore_index`` give loss 0)."""

    def __init__(self, *args, real_vocab_size: Optional[int] = None, ignore_index: int = -100,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.ignore_index = ignore_index
        self.cross_entropy_impl, self.cross_entropy_chunk = "unfused", None
        self.logit_scale, self.label_smoothing = 1.0, 0.0  # SFT controls (set_sft_loss)
        self._diagnostics_on, self._diagnostic_sums = False, None  # SFT saturation statistics
        self.uses_te = False  # set by the builder: Transformer Engine layers (THD packing)
        self._rope_position_ids = None  # [b, s] while a packed forward runs
        if self.position_embedding_type == "rope":
            self.rotary_pos_emb.register_forward_hook(self._rope_at_positions)
        self._zero_padded_vocab_rows()

    def _rope_at_positions(self, module, args, emb):
        """Forward hook of the rotary embedding: ``[s, 1, 1, d]`` angles for positions
        ``0..s-1`` become ``[s, b, 1, d]`` angles at each token's ``position_ids``."""
        positions = self._rope_position_ids
        if positions is None or isinstance(emb, tuple):
            return emb
        return emb[:, 0, 0, :][positions.t().to(emb.device)].unsqueeze(2)

    @contextlib.contextmanager
    def _positions(self, position_ids, rope_positions: bool):
        if not rope_positions:
            yield
            return
        if self.uses_te:
            raise ValueError("rope_positions is the local spec's packing; with Transformer "
                             "Engine pass packed_seq_params (THD) instead")
        self._rope_position_ids = position_ids
        try:
            yield
        finally:
            self._rope_position_ids = None

    def set_cross_entropy(self, impl: str, chunk_tokens: Optional[int] = None) -> None:
        """Choose how the loss is computed: ``unfused`` (the output layer makes the logits,
        then the loss) or ``chunked`` (:func:`megatron_wmss.loss.linear_cross_entropy` from
        the final hidden states and the output weight, no logits tensor; under sequence
        parallelism the hidden states are gathered along the sequence first, as the output
        layer does); ``chunk_tokens``: tokens per chunk (None: its default)."""
        if impl not in CROSS_ENTROPY_IMPLS:
            raise ValueError(f"cross-entropy implementation must be one of "
                             f"{list(CROSS_ENTROPY_IMPLS)}, got {impl!r}")
        self.cross_entropy_impl, self.cross_entropy_chunk = impl, chunk_tokens

    def set_sft_loss(self, logit_scale: float = 1.0, label_smoothing: float = 0.0) -> None:
        """The SFT loss variants of :class:`~megatron_wmss.config.training.SFTLossConfig`:
        CE(s·z) and label smoothing ε over the real vocabulary (both 'unfused' and
        'chunked'; scaling the hidden states scales the logits exactly)."""
        self.logit_scale, self.label_smoothing = float(logit_scale), float(label_smoothing)

    def record_diagnostics(self, enabled: bool) -> None:
        """Accumulate the saturation statistics of this model's distribution (the logits it
        is trained on) over the following forward passes, as JointGPTModel does for its
        three: the SFT side of the report's SFT-against-WMSS plots."""
        self._diagnostics_on, self._diagnostic_sums = bool(enabled), None

    def pop_diagnostics(self) -> dict[str, float]:
        """Token means since :meth:`record_diagnostics` over the global batch, keyed
        ``"model/<field>"`` (collective over data- and pipeline-parallel groups)."""
        from megatron.core import parallel_state

        from megatron_wmss.models.joint import DIAGNOSTIC_FIELDS
        from megatron_wmss.platform import default_device

        sums = self._diagnostic_sums
        if sums is None:
            sums = torch.zeros(len(DIAGNOSTIC_FIELDS) + 1, dtype=torch.float64,
                               device=default_device())
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        self.record_diagnostics(False)
        count = float(sums[-1])
        return {f"model/{name}": float(value) / count if count else float("nan")
                for name, value in zip(DIAGNOSTIC_FIELDS, sums[:-1].tolist())}

    @torch.no_grad()
    def _accumulate_diagnostics(self, logits, target) -> None:
        from megatron_wmss.loss import token_statistics
        from megatron_wmss.models.joint import DIAGNOSTIC_FIELDS

        stats = token_statistics([logits.detach()], target, tp_group=self.pg_collection.tp,
                                 ignore_index=self.ignore_index,
                                 vocab_size=self.real_vocab_size)[0]
        parts = [getattr(stats, name).sum() for name in DIAGNOSTIC_FIELDS] + [stats.valid.sum()]
        sums = torch.stack([p.to(torch.float64) for p in parts])
        self._diagnostic_sums = sums if self._diagnostic_sums is None else \
            self._diagnostic_sums + sums

    def output_weight(self) -> torch.Tensor:
        """This rank's ``[v, h]`` output-layer weight shard (the tied embedding's if tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def final_hidden_states(self, input_ids, position_ids, attention_mask, *,
                            rope_positions: bool = False, **kwargs):
        """The last stage's ``[s, b, h]`` hidden states after the final norm (``[s/tp, b, h]``,
        this rank's slice, under sequence parallelism): ``forward`` without the output
        layer."""
        post_process, self.post_process = self.post_process, False  # read by _postprocess
        try:
            with self._positions(position_ids, rope_positions):
                return super().forward(input_ids, position_ids, attention_mask, **kwargs)
        finally:
            self.post_process = post_process

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                *, rope_positions: bool = False, **kwargs):
        """megatron's forward; ``rope_positions``: rotate by ``position_ids`` (packed rows)."""
        if labels is None or not self.post_process or self.cross_entropy_impl == "unfused":
            with self._positions(position_ids, rope_positions):
                return super().forward(input_ids, position_ids, attention_mask, decoder_input,
                                       labels, **kwargs)
        hidden_sbh = self.final_hidden_states(input_ids, position_ids, attention_mask,
                                              rope_positions=rope_positions,
                                              decoder_input=decoder_input, **kwargs)
        if self.logit_scale != 1.0:
            hidden_sbh = hidden_sbh * self.logit_scale  # z = h·Wᵀ: the logits scale exactly
        target_sb = labels.transpose(0, 1)
        sequence_parallel = self.config.sequence_parallel  # hidden_sbh: [s/tp, b, h]
        if self._diagnostics_on:  # whole logits, a chunk of tokens at a time
            weight = self.output_weight().detach()
            flat_th = hidden_sbh.detach()
            if sequence_parallel:
                flat_th = gather_sequence_parallel(flat_th, self.pg_collection.tp)
            flat_th = flat_th.reshape(-1, hidden_sbh.shape[-1])
            chunk = max(1, (1 << 24) // weight.shape[0])
            for start in range(0, flat_th.shape[0], chunk):
                self._accumulate_diagnostics(flat_th[start:start + chunk] @ weight.t(),
                                             target_sb.reshape(-1)[start:start + chunk])
        loss_sb = linear_cross_entropy(hidden_sbh, self.output_weight(), target_sb,
                                       tp_group=self.pg_collection.tp,
                                       ignore_index=self.ignore_index,
                                       vocab_size=self.real_vocab_size,
                                       chunk_size=self.cross_entropy_chunk,
                                       sequence_parallel=sequence_parallel)
        if self.label_smoothing:
            loss_sb = loss_sb + self.label_smoothing * smoothing_term_from_hidden(
                hidden_sbh, self.output_weight(), target_sb, tp_group=self.pg_collection.tp,
                vocab_size=self.real_vocab_size, ignore_index=self.ignore_index,
                sequence_parallel=sequence_parallel)
        return loss_sb.transpose(0, 1).contiguous()

    @torch.no_grad()
    def _zero_padded_vocab_rows(self) -> None:
        if self.real_vocab_size is None:
            return
        weights = []
        if self.pre_process:
            weights.append(self.embedding.word_embeddings.weight)
        if self.post_process and self.output_layer.weight is not None:
            weights.append(self.output_layer.weight)  # a tied copy on a later stage too
        tp_rank = dist.get_rank(group=self.pg_collection.tp) if dist.is_initialized() else 0
        for weight_vh in weights:
            rows = weight_vh.shape[0]
            real = real_columns_in_shard(self.real_vocab_size, tp_rank * rows, rows)
            weight_vh[real:].zero_()

    def compute_language_model_loss(self, labels, logits):
        """``labels`` ``[b, s]``, ``logits`` ``[s, b, v]`` (this rank's shard) → loss ``[b, s]``."""
        # Transpose the small labels rather than the [s, b, v] logits (that would copy them).
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        target_sb = labels.transpose(0, 1)
        if self._diagnostics_on:
            self._accumulate_diagnostics(logits, target_sb)
        loss_sb = cross_entropy(logits, target_sb, tp_group=self.pg_collection.tp,
                                ignore_index=self.ignore_index, vocab_size=self.real_vocab_size)
        if self.label_smoothing:
            loss_sb = loss_sb + self.label_smoothing * smoothing_term(
                logits, target_sb, tp_group=self.pg_collection.tp,
                vocab_size=self.real_vocab_size, ignore_index=self.ignore_index)
        return loss_sb.transpose(0, 1).contiguous()
