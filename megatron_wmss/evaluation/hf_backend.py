"""lm-eval's ``hf`` backend with one stop rule at every batch size.

lm-eval's ``HFLM`` ends a batched generation when one stop string has occurred in *every* row
(one ``MultiTokenEOSCriteria`` per string, each waiting for all rows). Until then a row that
reached its stop keeps generating, and where that stop is a special token (a chat template's
``<|im_end|>``) the final decode, which skips special tokens, keeps what followed it: at batch
size > 1 the answer runs on past the end of the turn, where at batch size 1 it ends there.

``StopRuleHFLM`` (registered with lm-eval as ``wmss-hf``; ``wmss eval --backend hf``) generates
exactly as ``HFLM`` does, then ends every row of the batch where
:class:`~megatron_wmss.evaluation.backend.StopRule` ends a generation (the rule of ``HFLM`` at
batch size 1, which the megatron backend follows too) and overwrites the rest of the row with
the pad token: what ``transformers`` writes after a row that ended at EOS, and what ``HFLM``'s
decode drops. ``HFLM`` then decodes and cuts each row as usual, so every row returns the text
it would return at batch size 1. Only the returned text changes: sampling settings,
loglikelihoods and the batch's compute are ``HFLM``'s.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from megatron_wmss.evaluation.backend import EvalTokenizer, StopRule

__all__ = ["StopRuleHFLM", "stop_lengths"]


def stop_lengths(rule: StopRule, generated_bt: list[list[int]]) -> list[int]:
    """Per row of generated token ids ``[b][t]``: how many tokens precede the point where
    ``rule`` ends that generation (EOS excluded, a stop string's tokens included)."""
    lengths = []
    for row in generated_bt:
        kept: list[int] = []
        for token in row:
            if rule.add(kept, token):
                break
        lengths.append(len(kept))
    return lengths


@register_model("wmss-hf")
class StopRuleHFLM(HFLM):
    """``HFLM`` whose rows each end at their own stop (the module docstring); same arguments."""

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs
                        ) -> torch.Tensor:
        sequences_bs = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if self.backend != "causal":  # seq2seq outputs hold no prompt; not a wmss model
            return sequences_bs
        start = context.shape[1]
        rule = StopRule(EvalTokenizer(self.tokenizer.name_or_path, hf=self.tokenizer), stop,
                        max_new_tokens=sequences_bs.shape[1] - start)
        for row, kept in enumerate(stop_lengths(rule, sequences_bs[:, start:].tolist())):
            sequences_bs[row, start + kept:] = self.tokenizer.pad_token_id
        return sequences_bs
