"""Naive single-process references: gather the whole vocabulary, mix, use torch's own ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_mixed_ce(strong_tv, weak_tv, target_t, mix_lambda, ignore_index=-100):
    """Per-token ``F.cross_entropy`` of the fp32 mix of full-vocab logits (autograd-able)."""
    mixed = mix_lambda * strong_tv.float() + (1.0 - mix_lambda) * weak_tv.float()
    flat = mixed.reshape(-1, mixed.shape[-1])
    loss = F.cross_entropy(flat, target_t.reshape(-1), ignore_index=ignore_index,
                           reduction="none")
    return loss.view(target_t.shape)


def naive_statistics(logits, target, ignore_index=-100):
    """Entropy, target prob, margin and logit std per token from full-vocab logits."""
    z = logits.float().reshape(-1, logits.shape[-1])
    y = target.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, 0)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    target_prob = logp.gather(-1, y_safe[:, None]).exp().squeeze(-1)
    others = torch.ones_like(z, dtype=torch.bool).scatter(-1, y_safe[:, None], False)
    z_y = z.gather(-1, y_safe[:, None]).squeeze(-1)
    margin = z_y - (z * others).sum(-1) / others.sum(-1)
    logit_std = z.std(dim=-1, unbiased=False)
    out = {}
    for name, value in (("entropy", entropy), ("target_prob", target_prob),
                        ("margin", margin), ("logit_std", logit_std)):
        out[name] = torch.where(valid, value, 0.0).view(target.shape)
    return out


def make_case(seed, tokens_shape, vocab, dtype, ignore_fraction=0.25, scale=3.0):
    """Random strong/weak logits ``[*tokens_shape, vocab]`` and targets with ignored positions.

    ``scale`` spreads the logits so softmaxes are peaked, as after SFT.
    """
    gen = torch.Generator().manual_seed(seed)
    strong = (scale * torch.randn(*tokens_shape, vocab, generator=gen)).to(dtype)
    weak = (scale * torch.randn(*tokens_shape, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, tokens_shape, generator=gen)
    ignored = torch.rand(tokens_shape, generator=gen) < ignore_fraction
    target[ignored] = -100
    grad = torch.rand(tokens_shape, generator=gen)
    return strong, weak, target, grad


def pad_columns(logits, padded_vocab, fill="zeros", seed=0):
    """``logits`` ``[..., V]`` widened to ``padded_vocab`` columns, the new ones holding
    ``fill``: "zeros" (an imported model's padded rows), "large" (random values far above
    every real logit), "inf" or "nan"."""
    shape = (*logits.shape[:-1], padded_vocab - logits.shape[-1])
    if fill == "zeros":
        extra = torch.zeros(shape)
    elif fill == "large":
        gen = torch.Generator().manual_seed(seed)
        extra = 1e4 * (1 + torch.rand(shape, generator=gen))
    elif fill in ("inf", "nan"):
        extra = torch.full(shape, float(fill))
    else:
        raise ValueError(f"unknown fill {fill!r}")
    return torch.cat([logits, extra.to(logits.dtype)], dim=-1)
