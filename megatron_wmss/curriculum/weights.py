"""WD-DS sampling weights from per-sample entropies of the weak and the strong model.

Shape legend: n = number of samples. Inputs are per-sample mean token entropies in nats,
H_weak [n] and H_strong [n], and ΔH = H_strong − H_weak. Everything is float64.

Two published variants (WMSS.md §4):

- ``paper`` (paper v2 Eq. 9, the default):
  p_i ∝ α·[−ΔH_i]₊ + β·H_strong,i + γ·[ΔH_i]₊
  (α "consolidate": entropy the strong model lost; β "hard now": entropy it still has;
  γ "repair": entropy it gained over the weak model).
- ``reference`` (the authors' code):
  p_i = α·H_weak,i/ΣH_weak + β·[−ΔH_i]₊/Σ[−ΔH]₊ + γ·[ΔH_i]₊/Σ[ΔH]₊, then normalised;
  each term is normalised on its own, and a term whose sum is 0 contributes 0.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FORMULAS", "ZeroWeightsError", "check_coefficients", "discrepancy_scores",
           "discrepancy_weights", "normalize_scores"]

#: Accepted ``formula`` names; the first is the default.
FORMULAS = ("paper", "reference")


class ZeroWeightsError(ValueError):
    """Every sample's score is 0: there is no distribution to sample from."""


def check_coefficients(alpha: float, beta: float, gamma: float) -> None:
    """Refuse α, β, γ that are not finite and >= 0, or that are all 0 (ValueError naming them)."""
    values = {"alpha": alpha, "beta": beta, "gamma": gamma}
    for name, value in values.items():
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                or not math.isfinite(value) or value < 0):
            raise ValueError(f"{name} = {value!r} is invalid; allowed: a finite number >= 0")
    if all(value == 0 for value in values.values()):
        raise ValueError("alpha = beta = gamma = 0 gives every sample weight 0; allowed: "
                         "numbers >= 0, at least one of them > 0")


def _entropies(h_weak, h_strong) -> tuple[np.ndarray, np.ndarray]:
    h_weak = np.asarray(h_weak, dtype=np.float64).reshape(-1)
    h_strong = np.asarray(h_strong, dtype=np.float64).reshape(-1)
    if h_weak.shape != h_strong.shape:
        raise ValueError(f"h_weak has {h_weak.size} samples and h_strong {h_strong.size}; "
                         "they must be entropies of the same samples")
    for name, h in (("h_weak", h_weak), ("h_strong", h_strong)):
        if not np.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"{name} holds NaN, infinite or negative entropies; allowed: "
                             "finite values >= 0")
    return h_weak, h_strong


def _share(term: np.ndarray) -> np.ndarray:
    """``term / term.sum()``, or zeros when the sum is 0 (a term nobody has adds nothing)."""
    total = term.sum()
    return term / total if total > 0 else np.zeros_like(term)


def discrepancy_scores(h_weak, h_strong, *, formula: str = "paper", alpha: float = 0.1,
                       beta: float = 0.8, gamma: float = 0.1) -> np.ndarray:
    """[n] float64 unnormalised sampling scores (>= 0) of ``formula`` (see the module doc)."""
    if formula not in FORMULAS:
        raise ValueError(f"formula = {formula!r} is invalid; allowed: {', '.join(FORMULAS)}")
    check_coefficients(alpha, beta, gamma)
    h_weak, h_strong = _entropies(h_weak, h_strong)
    delta = h_strong - h_weak
    lost = np.maximum(-delta, 0.0)    # [−ΔH]₊: the strong model became more certain
    gained = np.maximum(delta, 0.0)   # [ΔH]₊: the strong model became less certain
    if formula == "paper":
        return alpha * lost + beta * h_strong + gamma * gained
    return alpha * _share(h_weak) + beta * _share(lost) + gamma * _share(gained)


def normalize_scores(scores) -> np.ndarray:
    """[n] float64 probabilities ``scores / sum(scores)``; ZeroWeightsError if the sum is 0."""
    scores = np.asarray(scores, dtype=np.float64)
    total = scores.sum()
    if not total > 0:
        raise ZeroWeightsError(f"all {scores.size} sampling weights are zero")
    return scores / total


def discrepancy_weights(h_weak, h_strong, *, formula: str = "paper", alpha: float = 0.1,
                        beta: float = 0.8, gamma: float = 0.1) -> np.ndarray:
    """[n] float64 sampling probabilities p (sum 1) of ``formula``; see the module doc."""
    return normalize_scores(discrepancy_scores(h_weak, h_strong, formula=formula, alpha=alpha,
                                               beta=beta, gamma=gamma))
