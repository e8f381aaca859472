"""megatron_wmss: Weak-Driven Learning (WMSS) on megatron-core.

A strong and a weak copy of one decoder LM are trained on the cross-entropy of their mixed
logits ``mix_lambda * z_strong + (1 - mix_lambda) * z_weak``; only the strong model is kept.
Importing this package never imports Transformer Engine or Apex: GPU-only libraries are
loaded lazily by :mod:`megatron_wmss.platform`, and only where CUDA exists.
"""

__version__ = "0.1.0"
