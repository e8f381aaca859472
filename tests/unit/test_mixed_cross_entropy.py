"""Single-process properties of the mixed cross-entropy and its diagnostics.

The multi-rank (TP 1/2/4) comparisons live in tests/distributed/test_mixed_ce_tp.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.loss import (
    cross_entropy,
    mixed_cross_entropy,
    mixed_logit_diagnostics,
    token_statistics,
)
from tests.naive import make_case, naive_mixed_ce, naive_statistics, pad_columns

# fp32: the two implementations sum the same fp32 terms in a different order; over V <= 1000
# terms that moves a loss of O(10) nats by a few ulps (~1e-6) and a probability by ~1e-7.
FP32_LOSS_ATOL, FP32_GRAD_ATOL = 1e-5, 1e-6
# bf16 gradients: both sides round nearly equal fp32 values to bf16 once, so they may differ by
# one bf16 ulp (relative 2^-7); the atol covers fp32 noise on gradients that are ~0.
BF16_GRAD_RTOL = 2.0**-7

LAMBDAS = [0.0, 0.3, 0.5, 1.0]


def _run_both(strong, weak, target, grad, lam, strong_grad=True, weak_grad=True):
    s = strong.clone().requires_grad_(strong_grad)
    w = weak.clone().requires_grad_(weak_grad)
    loss = mixed_cross_entropy(s, w, target, lam)
    loss.backward(grad)
    s_ref = strong.clone().requires_grad_(True)
    w_ref = weak.clone().requires_grad_(True)
    ref = naive_mixed_ce(s_ref, w_ref, target, lam)
    ref.backward(grad)
    return (loss, s.grad, w.grad), (ref, s_ref.grad, w_ref.grad)


def _assert_grad_close(got, want, dtype):
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=FP32_GRAD_ATOL, rtol=0)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=FP32_GRAD_ATOL,
                                   rtol=BF16_GRAD_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_loss_and_gradients_match_autograd_of_naive_mix(lam, dtype):
    strong, weak, target, grad = make_case(0, (3, 7), 97, dtype)
    (loss, gs, gw), (ref, gs_ref, gw_ref) = _run_both(strong, weak, target, grad, lam)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, ref.detach(), atol=FP32_LOSS_ATOL, rtol=0)
    assert torch.all(loss[target == -100] == 0)
    _assert_grad_close(gs, gs_ref, dtype)
    _assert_grad_close(gw, gw_ref, dtype)


def test_gradients_are_exactly_lambda_scaled_copies():
    strong, weak, target, grad = make_case(1, (16,), 64, torch.float32)
    s, w = strong.clone().requires_grad_(), weak.clone().requires_grad_()
    mixed_cross_entropy(s, w, target, 0.25).backward(grad)
    # dL/dz_s = λ·g and dL/dz_w = (1−λ)·g: with λ = 1/4 both scalings are exact in fp32.
    torch.testing.assert_close(s.grad * 3.0, w.grad, atol=0, rtol=0)
    assert torch.all(s.grad[target == -100] == 0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_zero_weight_model_gets_exactly_zero_gradient(lam):
    strong, weak, target, grad = make_case(2, (12,), 40, torch.float32)
    s, w = strong.clone().requires_grad_(), weak.clone().requires_grad_()
    mixed_cross_entropy(s, w, target, lam).backward(grad)
    silent = w.grad if lam == 1.0 else s.grad
    assert torch.count_nonzero(silent) == 0


@pytest.mark.parametrize("strong_grad,weak_grad", [(True, False), (False, True)])
def test_either_input_may_be_frozen(strong_grad, weak_grad):
    strong, weak, target, grad = make_case(3, (2, 5), 33, torch.bfloat16)
    (loss, gs, gw), (ref, gs_ref, gw_ref) = _run_both(
        strong, weak, target, grad, 0.5, strong_grad, weak_grad)
    torch.testing.assert_close(loss, ref.detach(), atol=FP32_LOSS_ATOL, rtol=0)
    if strong_grad:
        _assert_grad_close(gs, gs_ref, torch.bfloat16)
        assert gw is None
    else:
        _assert_grad_close(gw, gw_ref, torch.bfloat16)
        assert gs is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_bit_identical_after_forward_and_backward(dtype):
    strong, weak, target, grad = make_case(4, (4, 6), 50, dtype)
    s, w, y = strong.clone().requires_grad_(), weak.clone().requires_grad_(), target.clone()
    mixed_cross_entropy(s, w, y, 0.5).backward(grad)
    mixed_logit_diagnostics(s, w, y, 0.5)
    assert torch.equal(s.detach(), strong) and torch.equal(w.detach(), weak)
    assert torch.equal(y, target)


def test_non_contiguous_sequence_first_logits():
    # Megatron's logits are [s, b, v] while targets are [b, s]: callers transpose views.
    strong, weak, target, grad = make_case(5, (4, 6), 30, torch.float32)
    s_sbv = strong.transpose(0, 1).contiguous().requires_grad_()
    loss = mixed_cross_entropy(s_sbv.transpose(0, 1), weak, target, 0.4)
    loss.backward(grad)
    ref = naive_mixed_ce(strong, weak, target, 0.4)
    torch.testing.assert_close(loss, ref, atol=FP32_LOSS_ATOL, rtol=0)
    assert s_sbv.grad.shape == s_sbv.shape


def test_second_backward_through_same_graph_is_refused():
    strong, weak, target, grad = make_case(6, (5,), 20, torch.float32)
    s = strong.clone().requires_grad_()
    loss = mixed_cross_entropy(s, weak, target, 0.5)
    loss.backward(grad, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(grad)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan"), True, "0.5", torch.ones(2)])
def test_lambda_outside_unit_interval_is_rejected(lam):
    strong, weak, target, _ = make_case(7, (3,), 10, torch.float32)
    with pytest.raises(ValueError, match="mix_lambda"):
        mixed_cross_entropy(strong, weak, target, lam)


def test_tensor_lambda_is_accepted():
    strong, weak, target, _ = make_case(7, (3,), 10, torch.float32)
    got = mixed_cross_entropy(strong, weak, target, torch.tensor(0.3))
    torch.testing.assert_close(got, naive_mixed_ce(strong, weak, target, 0.3),
                               atol=FP32_LOSS_ATOL, rtol=0)


def test_bad_shapes_and_targets_are_rejected_with_the_argument_named():
    strong, weak, target, _ = make_case(8, (2, 3), 10, torch.float32)
    with pytest.raises(ValueError, match="strong_logits and weak_logits must have the same shape"):
        mixed_cross_entropy(strong, weak[..., :9], target, 0.5)
    with pytest.raises(ValueError, match="target must hold integer token ids"):
        mixed_cross_entropy(strong, weak, target.float(), 0.5)
    with pytest.raises(ValueError, match=r"target must have the logits' shape"):
        mixed_cross_entropy(strong, weak, target[:, :2], 0.5)
    with pytest.raises(ValueError, match="weak_logits must be a floating-point"):
        mixed_cross_entropy(strong, target, target, 0.5)
    for bad_id in (10, -1):
        bad = target.clone()
        bad[0, 0] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id} outside \[0, 10\)"):
            mixed_cross_entropy(strong, weak, bad, 0.5)


def test_ignore_index_is_configurable():
    strong, weak, target, _ = make_case(9, (8,), 12, torch.float32)
    target[target == -100] = 11  # a real id now; ignore the id 3 instead
    got = mixed_cross_entropy(strong, weak, target, 0.5, ignore_index=3)
    ref = naive_mixed_ce(strong, weak, target, 0.5, ignore_index=3)
    torch.testing.assert_close(got, ref, atol=FP32_LOSS_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diagnostics_match_naive_statistics(dtype):
    strong, weak, target, _ = make_case(10, (3, 5), 77, dtype)
    lam = 0.42
    stats = mixed_logit_diagnostics(strong, weak, target, lam)
    mixed = lam * strong.float() + (1 - lam) * weak.float()
    for name, logits in (("strong", strong), ("weak", weak), ("mixed", mixed)):
        want = naive_statistics(logits, target)
        for field, value in want.items():
            # Entropy/margin/std are O(1..10) sums of <= 77 fp32 terms: 1e-5 covers ordering.
            torch.testing.assert_close(getattr(stats[name], field), value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name}.{field}: {m}")


def test_diagnostic_means_ignore_unsupervised_tokens():
    strong, _, target, _ = make_case(11, (20,), 16, torch.float32, ignore_fraction=0.5)
    (stats,) = token_statistics([strong], target)
    valid = target != -100
    want = naive_statistics(strong, target)["entropy"][valid].mean()
    assert stats.means()["entropy"] == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_only_one_fp32_logit_sized_tensor(dtype):
    # Activation memory is the bottleneck at V/tp ~ 76k columns: the loss may keep the fp32
    # softmax and nothing else logit-sized (not the inputs, not a second mixed copy).
    strong, weak, target, _ = make_case(12, (6, 5), 64, dtype)
    s, w = strong.clone().requires_grad_(), weak.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixed_cross_entropy(s, w, target, 0.5)
    logit_sized = [(shape, dt) for shape, dt in saved if len(shape) == 2 and shape[-1] == 64]
    assert logit_sized == [((30, 64), torch.float32)]
    assert all(len(shape) <= 1 for shape, _ in saved if (shape, _) not in logit_sized)


def test_diagnostics_handle_masked_vocab_columns():
    # Masking columns with -inf (e.g. padded vocab rows) must not turn entropies into nan.
    strong, _, target, _ = make_case(13, (10,), 20, torch.float32, ignore_fraction=0.0)
    target = target % 16
    masked = strong.clone()
    masked[:, 16:] = float("-inf")
    (stats,) = token_statistics([masked], target)
    want = naive_statistics(strong[:, :16], target)
    torch.testing.assert_close(stats.entropy, want["entropy"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.target_prob, want["target_prob"], atol=1e-6, rtol=1e-5)


def test_double_backward_is_refused_clearly():
    strong, weak, target, grad = make_case(14, (4,), 10, torch.float32)
    s = strong.clone().requires_grad_()
    loss = mixed_cross_entropy(s, weak, target, 0.5)
    (g,) = torch.autograd.grad(loss, s, grad.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        g.sum().backward()


# Real vocabulary: 97 real columns padded to 128 (megatron's rule at TP=1 is 128·TP).
REAL, PADDED = 97, 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_padded_columns_are_outside_the_softmax(lam, dtype):
    strong, weak, target, grad = make_case(20, (3, 7), REAL, dtype)
    s_ref, w_ref = strong.clone().requires_grad_(), weak.clone().requires_grad_()
    ref = naive_mixed_ce(s_ref, w_ref, target, lam)  # over the unpadded vocabulary
    ref.backward(grad)
    results = {}
    for fill in ("zeros", "large", "inf", "nan"):
        s = pad_columns(strong, PADDED, fill).requires_grad_()
        w = pad_columns(weak, PADDED, fill, seed=1).requires_grad_()
        loss = mixed_cross_entropy(s, w, target, lam, vocab_size=REAL)
        loss.backward(grad)
        results[fill] = (loss, s.grad, w.grad)
        assert torch.count_nonzero(s.grad[..., REAL:]) == 0
        assert torch.count_nonzero(w.grad[..., REAL:]) == 0
        _assert_grad_close(s.grad[..., :REAL], s_ref.grad, dtype)
        _assert_grad_close(w.grad[..., :REAL], w_ref.grad, dtype)
    torch.testing.assert_close(results["zeros"][0], ref.detach(), atol=FP32_LOSS_ATOL, rtol=0)
    for fill in ("large", "inf", "nan"):  # what the padded columns hold never matters
        for got, want in zip(results[fill], results["zeros"]):
            assert torch.equal(got, want), fill


def test_zero_padding_changes_the_loss_without_vocab_size():
    # What the mask fixes: 84 zero columns next to 300 real ones at logit scale 0.5.
    strong, weak, target, _ = make_case(21, (64,), 300, torch.float32, scale=0.5)
    padded = pad_columns(strong, 384), pad_columns(weak, 384)
    masked = mixed_cross_entropy(*padded, target, 0.5, vocab_size=300)
    unmasked = mixed_cross_entropy(*padded, target, 0.5)
    torch.testing.assert_close(masked, naive_mixed_ce(strong, weak, target, 0.5),
                               atol=FP32_LOSS_ATOL, rtol=0)
    valid = target != -100
    assert float((unmasked - masked)[valid].mean()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_model_cross_entropy_is_torch_cross_entropy_over_real_columns(dtype):
    logits, _, target, grad = make_case(22, (4, 9), REAL, dtype)
    ref_in = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in.float().reshape(-1, REAL), target.reshape(-1),
                                            reduction="none").view(target.shape)
    ref.backward(grad)
    x = pad_columns(logits, PADDED, "large").requires_grad_()
    loss = cross_entropy(x, target, vocab_size=REAL)
    loss.backward(grad)
    torch.testing.assert_close(loss, ref.detach(), atol=FP32_LOSS_ATOL, rtol=0)
    _assert_grad_close(x.grad[..., :REAL], ref_in.grad, dtype)
    assert torch.count_nonzero(x.grad[..., REAL:]) == 0


def test_targets_in_the_padding_and_bad_vocab_sizes_are_rejected():
    logits, _, target, _ = make_case(23, (6,), PADDED, torch.float32)
    target[0] = REAL  # a padded column: no token has this id
    with pytest.raises(ValueError, match=rf"token id {REAL} outside \[0, {REAL}\) \(the real"):
        cross_entropy(logits, target, vocab_size=REAL)
    with pytest.raises(ValueError, match="vocab_size=129 exceeds the 128 columns"):
        cross_entropy(logits, target % REAL, vocab_size=PADDED + 1)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            mixed_cross_entropy(logits, logits, target % REAL, 0.5, vocab_size=bad)


@pytest.mark.parametrize("fill", ["zeros", "large", "inf", "nan"])
def test_diagnostics_cover_real_columns_only(fill):
    strong, weak, target, _ = make_case(24, (3, 5), REAL, torch.float32)
    lam = 0.42
    stats = mixed_logit_diagnostics(pad_columns(strong, PADDED, fill),
                                    pad_columns(weak, PADDED, fill, seed=1), target, lam,
                                    vocab_size=REAL)
    mixed = lam * strong + (1 - lam) * weak
    for name, logits in (("strong", strong), ("weak", weak), ("mixed", mixed)):
        for field, want in naive_statistics(logits, target).items():
            got = getattr(stats[name], field)
            assert torch.isfinite(got).all(), f"{name}.{field} not finite"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name}.{field}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", ["zeros", "large", "nan"])
def test_token_entropy_is_the_entropy_over_real_columns(dtype, fill):
    from megatron_wmss.loss import token_entropy

    logits, _, _, _ = make_case(25, (3, 7), REAL, dtype)
    padded = pad_columns(logits, PADDED, fill)
    before = padded.clone()
    got = token_entropy(padded, vocab_size=REAL)
    logp = torch.log_softmax(logits.double(), dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    # fp32 sums over 97 terms against fp64: a few ulps of an O(1..5) entropy.
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.dtype == torch.float32 and torch.equal(padded.nan_to_num(), before.nan_to_num())


def test_token_entropy_with_a_mask_computes_only_those_positions():
    from megatron_wmss.loss import token_entropy

    logits, _, target, _ = make_case(26, (4, 9), REAL, torch.bfloat16)
    mask = target != -100
    full = token_entropy(logits)
    masked = token_entropy(logits, mask=mask)
    torch.testing.assert_close(masked[mask], full[mask], atol=0, rtol=0)
    assert torch.count_nonzero(masked[~mask]) == 0
    with pytest.raises(ValueError, match="mask must be bool"):
        token_entropy(logits, mask=mask.int())
