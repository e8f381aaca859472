"""Vocabulary padding: the one rule the tokenizer, the model builder and checkpoint interop share.

Megatron shards the embedding and output layer over tensor-parallel ranks along the vocabulary,
so the vocabulary is padded to a multiple of ``multiple * tensor_parallel_size`` (Megatron-LM's
``make_vocab_size_divisible_by`` rule, default 128). Strong and weak models must use the same
padded size so that every rank holds the same vocab slice of both.
"""

from __future__ import annotations

__all__ = ["padded_vocab_size"]


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple * tensor_parallel_size`` that is >= ``vocab_size``."""
    for name, value in (("vocab_size", vocab_size), ("tensor_parallel_size", tensor_parallel_size),
                        ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    step = multiple * tensor_parallel_size
    return -(-vocab_size // step) * step
