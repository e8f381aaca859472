"""The mixed cross-entropy on CUDA against an fp64 CPU reference over the real vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_wmss.loss import cross_entropy, mixed_cross_entropy
from tests.naive import make_case, pad_columns

REAL, PADDED = 1000, 1024
# The CUDA kernels compute in fp32 against an fp64 reference: a loss of O(10) nats summed over
# 1000 columns is off by a few fp32 ulps (~1e-6); bf16 gradients by one bf16 ulp (2^-7 rel).
LOSS_ATOL, GRAD_ATOL, BF16_GRAD_RTOL = 1e-5, 1e-6, 2.0**-7


def _fp64_reference(strong, weak, target, grad, lam):
    s = strong.double().requires_grad_()
    w = weak.double().requires_grad_()
    mixed = lam * s + (1 - lam) * w
    loss = F.cross_entropy(mixed.reshape(-1, REAL), target.reshape(-1), reduction="none",
                           ignore_index=-100).view(target.shape)
    loss.backward(grad.double())
    return loss.detach(), s.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [0.42, 1.0])
def test_mixed_ce_on_cuda_matches_fp64_cpu_reference(dtype, lam):
    strong, weak, target, grad = make_case(0, (8, 64), REAL, dtype)
    ref_loss, ref_gs, ref_gw = _fp64_reference(strong, weak, target, grad, lam)
    s = pad_columns(strong, PADDED, "large").cuda().requires_grad_()
    w = pad_columns(weak, PADDED, "nan").cuda().requires_grad_()
    loss = mixed_cross_entropy(s, w, target.cuda(), lam, vocab_size=REAL)
    loss.backward(grad.cuda())
    assert loss.device.type == "cuda" and loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=LOSS_ATOL, rtol=0)
    rtol = 0.0 if dtype == torch.float32 else BF16_GRAD_RTOL
    for got, want in ((s.grad, ref_gs), (w.grad, ref_gw)):
        assert got.dtype == dtype
        assert torch.count_nonzero(got[..., REAL:]) == 0
        torch.testing.assert_close(got[..., :REAL].cpu().double(), want, atol=GRAD_ATOL,
                                   rtol=rtol)


def test_single_model_cross_entropy_on_cuda_matches_fp64_reference():
    logits, _, target, grad = make_case(1, (4, 128), REAL, torch.bfloat16)
    ref_loss, ref_g, _ = _fp64_reference(logits, logits, target, grad, 1.0)
    x = pad_columns(logits, PADDED).cuda().requires_grad_()
    loss = cross_entropy(x, target.cuda(), vocab_size=REAL)
    loss.backward(grad.cuda())
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=LOSS_ATOL, rtol=0)
    torch.testing.assert_close(x.grad[..., :REAL].cpu().double(), ref_g, atol=GRAD_ATOL,
                               rtol=BF16_GRAD_RTOL)
