"""megatron-core's ``GPTModel`` with its language-model loss taken over the real vocabulary.

megatron pads the vocabulary to a multiple of 128·TP, and its own cross-entropy softmaxes over
every padded column too (logit 0 for an imported model), so the objective would change with TP
and differ from the exported model's. This subclass changes only the loss: the same layers,
state-dict keys and checkpoints as ``GPTModel``.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from megatron_wmss.loss import cross_entropy

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

    def compute_language_model_loss(self, labels, logits):
        """``labels`` ``[b, s]``, ``logits`` ``[s, b, v]`` (this rank's shard) → loss ``[b, s]``."""
        # Transpose the small labels rather than the [s, b, v] logits (that would copy them).
        loss_sb = cross_entropy(logits, labels.transpose(0, 1), tp_group=self.pg_collection.tp,
                                ignore_index=self.ignore_index, vocab_size=self.real_vocab_size)
        return loss_sb.transpose(0, 1).contiguous()
