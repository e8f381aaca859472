"""megatron-core's ``GPTModel`` with its language-model loss taken over the real vocabulary.

megatron pads the vocabulary to a multiple of 128·TP, and its own cross-entropy softmaxes over
every padded column too (logit 0 for an imported model), so the objective would change with TP
and differ from the exported model's. This subclass changes only the loss: the same layers,
state-dict keys and checkpoints as ``GPTModel``.

Padded rows of the embedding and output layer start at zero (an imported model's are zero
too) and stay zero: their logits are outside the softmax, so their gradient is exactly zero,
no real token looks them up, and weight decay keeps a zero at zero.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_wmss.loss import cross_entropy
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
        self._zero_padded_vocab_rows()

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
        loss_sb = cross_entropy(logits, labels.transpose(0, 1), tp_group=self.pg_collection.tp,
                                ignore_index=self.ignore_index, vocab_size=self.real_vocab_size)
        return loss_sb.transpose(0, 1).contiguous()
