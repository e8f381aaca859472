"""WMSS losses: the vocab-parallel mixed cross-entropy (on logits, or chunked from hidden states)
and its saturation diagnostics."""

from megatron_wmss.loss.diagnostics import (
    TokenStatistics,
    mixed_logit_diagnostics,
    token_entropy,
    token_statistics,
)
from megatron_wmss.loss.linear_cross_entropy import (
    linear_cross_entropy,
    linear_mixed_cross_entropy,
)
from megatron_wmss.loss.mixed_cross_entropy import cross_entropy, mixed_cross_entropy

__all__ = [
    "TokenStatistics",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_mixed_cross_entropy",
    "mixed_cross_entropy",
    "mixed_logit_diagnostics",
    "token_entropy",
    "token_statistics",
]
