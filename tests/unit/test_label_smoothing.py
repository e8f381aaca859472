"""Label smoothing and the logit scale of the SFT controls against torch's own
``F.cross_entropy(label_smoothing=ε)`` with autograd, on one process (the term's vocab-parallel
sum uses megatron's all-reduce, the same mapping the column-parallel output layer uses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_wmss.loss import cross_entropy, linear_cross_entropy
from megatron_wmss.loss.smoothing import smoothing_term, smoothing_term_from_hidden

V_REAL, V_PADDED, H, T = 37, 48, 16, 23


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V_PADDED, H, generator=g, dtype=torch.float64) * 0.5
    weight[V_REAL:] = 7.0  # padded rows: must never count
    target = torch.randint(0, V_REAL, (T,), generator=g)
    target[::5] = -100
    return hidden, weight, target


def _reference(hidden, weight, target, eps, scale):
    logits = scale * hidden @ weight[:V_REAL].t()
    loss = F.cross_entropy(logits, target, ignore_index=-100, label_smoothing=eps,
                           reduction="none")
    return loss


@pytest.mark.parametrize("eps,scale", [(0.1, 1.0), (0.3, 0.5), (0.0, 0.5)])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_smoothed_and_scaled_ce_matches_torch_with_its_gradients(eps, scale, path):
    hidden, weight, target = _inputs()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _reference(h_ref, w_ref, target, eps, scale)
    ref.sum().backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if path == "logits":
        logits = (scale * h) @ w.t()
        loss = cross_entropy(logits, target, vocab_size=V_REAL) + eps * smoothing_term(
            logits, target, vocab_size=V_REAL)
    else:
        hs = scale * h
        loss = linear_cross_entropy(hs, w, target, vocab_size=V_REAL) + eps * \
            smoothing_term_from_hidden(hs, w, target, vocab_size=V_REAL)
    loss.sum().backward()
    # fp64 inputs; the losses compute in fp32 (project rule), so fp32 rounding bounds the gap.
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad[:V_REAL], w_ref.grad[:V_REAL], atol=2e-5, rtol=1e-4)
    assert torch.all(w.grad[V_REAL:] == 0)
    assert torch.all(loss[target == -100] == 0)
