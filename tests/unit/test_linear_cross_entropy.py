"""The chunked linear cross-entropy in one process: no ``[T, V]`` tensor ever exists, fp64
gradcheck, and input errors (the numerics at TP 1/2: tests/distributed/test_linear_ce_tp.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_wmss.loss.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_mixed_cross_entropy,
    vocab_block_size,
)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns, leaving out those
    shaped like the weights (their gradients)."""

    def __init__(self, weight_shapes):
        super().__init__()
        self.weight_shapes, self.largest = set(weight_shapes), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.weight_shapes:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_tokens_by_the_vocabulary_is_made():
    tokens, vocab, chunk = 160, 1000, 32
    gen = torch.Generator().manual_seed(0)
    hs, hw = (torch.randn(tokens, h, generator=gen, requires_grad=True) for h in (24, 8))
    ws, ww = (torch.randn(vocab, h, generator=gen, requires_grad=True) for h in (24, 8))
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    shapes = [(vocab, 24), (vocab, 8)]
    with _LargestOutput(shapes) as seen:
        loss = linear_mixed_cross_entropy(hs, hw, ws, ww, target, 0.5, chunk_size=chunk)
        loss.sum().backward()
    assert 0 < seen.largest <= chunk * vocab < tokens * vocab, seen.largest
    # The unfused path, for contrast: the mode sees its [T, V] logits.
    with _LargestOutput(shapes) as seen:
        (hs @ ws.T).sum()
    assert seen.largest == tokens * vocab


def test_tiles_cover_about_a_million_logits():
    assert default_chunk_size(151936) == 2048
    assert vocab_block_size(2048, 151936) == 512 and vocab_block_size(2048, 100) == 100
    assert vocab_block_size(10 ** 7, 151936) == 1


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
              for shape in ((2, 5, 6), (2, 5, 4), (11, 6), (11, 4))]
    target = torch.randint(0, 9, (2, 5), generator=gen)
    target[0, 1] = -100

    def loss(*xs):
        return linear_mixed_cross_entropy(*xs, target, 0.3, vocab_size=9, chunk_size=3)

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_bad_inputs_name_the_problem():
    h, w, y = torch.randn(4, 6), torch.randn(10, 6), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weak: hidden states and output weight are both"):
        linear_mixed_cross_entropy(h, None, w, None, y, 0.5)
    with pytest.raises(ValueError, match=r"must share h, got \(4, 6\) and \(10, 5\)"):
        linear_cross_entropy(h, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="same tokens and the same vocab shard"):
        linear_mixed_cross_entropy(h, torch.randn(4, 3), w, torch.randn(12, 3), y, 0.5)
    with pytest.raises(ValueError, match="target must have the hidden states' shape"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 10]))
    # At λ = 1 the weak model is not needed at all.
    assert linear_mixed_cross_entropy(h, None, w, None, y, 1.0).shape == (4,)
