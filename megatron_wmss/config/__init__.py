"""Typed configuration owned by the components that use it; YAML recipes fill these."""

from megatron_wmss.config.vocab import padded_vocab_size

__all__ = ["padded_vocab_size"]
