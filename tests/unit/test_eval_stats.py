"""The paired bootstrap behind the reports' verdicts (megatron_wmss.evaluation.stats): its
resampling distribution against an exact enumeration, the verdict at the interval's edges,
pairing by doc id, and the errors."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from megatron_wmss.evaluation.stats import (
    bootstrap_statistics,
    compare_problems,
    compare_seeds,
    paired_differences,
    verdict,
)
from megatron_wmss.platform.errors import UserError

# Two seeds x three problems, scores 0/1 of models A and B. Chosen so that the plausible wrong
# bootstraps are far from the right one in CDF distance (computed exactly, like `_exact`):
# seeds only 0.198, the same problem draw reused for a seed drawn twice 0.067, A and B
# resampled independently (unpaired) 0.023, the problems of both seeds pooled 0.020.
A = [[1, 1, 0], [0, 1, 1]]
B = [[0, 1, 0], [1, 1, 0]]
R = 200_000
# Dvoretzky-Kiefer-Wolfowitz: P(sup_x |F_R(x) - F(x)| > eps) <= 2 exp(-2 R eps^2) = 1e-6 for
# this eps (0.0060 at R = 200,000): below every wrong variant's distance above, so the test
# fails for each of them and passes for a right implementation but once in a million seeds.
EPS = math.sqrt(math.log(2 / 1e-6) / (2 * R))


def _exact(differences: list[list[int]]) -> dict[Fraction, Fraction]:
    """The bootstrap distribution by enumeration: every ordered draw of seeds, and for each
    drawn seed every ordered draw of its problems (2 seeds x 3 problems: 4 x 27 x 27 equally
    likely outcomes); exact fractions."""
    n_seeds = len(differences)
    counts: Counter = Counter()
    for picks in itertools.product(range(n_seeds), repeat=n_seeds):
        draws = [itertools.product(differences[s], repeat=len(differences[s])) for s in picks]
        for combo in itertools.product(*draws):
            counts[sum(Fraction(sum(c), len(c)) for c in combo) / n_seeds] += 1
    total = sum(counts.values())
    return {value: Fraction(c, total) for value, c in counts.items()}


def _cdf(distribution: dict, x: float) -> float:
    return float(sum(p for v, p in distribution.items() if v <= x + 1e-12))


def _quantile(distribution: dict, q: float) -> float:
    """The smallest support point with CDF >= q."""
    for value in sorted(distribution):
        if _cdf(distribution, float(value)) >= q:
            return float(value)
    return float(max(distribution))


@pytest.mark.parametrize("a,b", [(A, B), ([[1, 0, 1, 0, 1]], [[0, 0, 1, 1, 0]])],
                         ids=["2seeds_x_3problems", "1seed_x_5problems"])
def test_resampling_distribution_and_interval_match_the_exact_bootstrap(a, b):
    differences = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    exact = _exact(differences)
    sampled = bootstrap_statistics([[np.array(d, float)] for d in differences], R,
                                   np.random.default_rng(1))
    sampled.sort()
    for value in exact:  # the CDF is a step function: its sup distance is reached on the support
        empirical = np.searchsorted(sampled, float(value) + 1e-12, side="right") / R
        assert abs(empirical - _cdf(exact, float(value))) <= EPS, value
    comparison = compare_problems({str(k): [d] for k, d in enumerate(differences)},
                                  n_resamples=R)
    # A percentile bound within EPS in CDF lies between the exact quantiles at q -/+ EPS.
    for bound, q in ((comparison.low, 0.025), (comparison.high, 0.975)):
        assert _quantile(exact, q - EPS) - 1e-12 <= bound <= _quantile(exact, q + EPS) + 1e-12
    mean = float(np.mean([np.mean(d) for d in differences]))
    assert comparison.difference == pytest.approx(mean)
    assert comparison.per_seed == pytest.approx({str(k): np.mean(d)
                                                 for k, d in enumerate(differences)})


def test_the_method_says_which_bootstrap_ran():
    two = compare_problems({"1": [np.array([1.0, 0.0])], "2": [np.array([0.0, 1.0])]})
    assert two.method.startswith("paired bootstrap over seeds and problems")
    one = compare_problems({"1": [np.array([1.0, 0.0])]})
    assert one.method.startswith("paired bootstrap over problems only (one seed")
    assert "10,000 resamples" in one.method and one.n_resamples == 10_000
    seeds = compare_seeds({"1": 0.1, "2": 0.3}, reason="no per-problem results for x")
    assert seeds.method.startswith("bootstrap over seeds only (no per-problem results for x)")
    lone = compare_seeds({"1": 0.4}, reason="no per-problem results for x")
    assert (lone.low, lone.high, lone.verdict) == (None, None, "not resolved at 95%")


@pytest.mark.parametrize("low,high,expected", [
    (0.0, 0.2, "not resolved at 95%"),      # touching 0 from above
    (-0.2, 0.0, "not resolved at 95%"),     # touching 0 from below
    (-1e-17, 0.3, "not resolved at 95%"),   # 0 up to rounding
    (0.0, 0.0, "not resolved at 95%"),
    (-0.1, 0.1, "not resolved at 95%"),
    (0.001, 0.2, "higher"),
    (-0.2, -0.001, "lower"),
    (None, None, "not resolved at 95%"),
])
def test_verdict_wording_at_the_boundaries(low, high, expected):
    assert verdict(low, high) == expected


def test_an_interval_whose_lower_bound_is_exactly_zero_is_not_resolved():
    # B never beats A, A beats B once in 5: P(no win in a resample) = 0.8^5 = 0.33 > 2.5%, so
    # the lower percentile is exactly 0 (a `>=` verdict would call this "higher").
    result = compare_problems({"1": [np.array([1.0, 0, 0, 0, 0])]})
    assert result.low == 0.0 and result.high > 0
    assert result.verdict == "not resolved at 95%"
    always = compare_problems({"1": [np.ones(5)]})
    assert (always.low, always.high, always.verdict) == (1.0, 1.0, "higher")


def test_pairing_is_by_doc_id_not_by_row_order():
    rng = random.Random(0)
    a = {i: float(rng.random() < 0.6) for i in range(40)}
    b = {i: float(rng.random() < 0.4) for i in range(40)}
    shuffled = dict(rng.sample(sorted(b.items()), len(b)))
    assert list(shuffled) != list(b)
    d = paired_differences(a, b, task="gsm8k")
    assert np.array_equal(d, paired_differences(a, shuffled, task="gsm8k"))
    assert np.array_equal(d, [a[i] - b[i] for i in range(40)])
    # A model against itself, its rows in another order: no difference and no spread.
    same = compare_problems({"1": [paired_differences(a, dict(rng.sample(sorted(a.items()),
                                                                        len(a))), task="t")]})
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_mismatched_doc_ids_are_one_line_naming_the_task():
    with pytest.raises(UserError) as err:
        paired_differences({0: 1.0, 1: 0.0, 2: 1.0}, {0: 1.0, 1: 1.0, 5: 0.0}, task="aime25",
                           names=("wmss", "sft"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("task aime25: wmss and sft scored "
                                                      "different problems")
    assert "[2]" in message and "[5]" in message


def test_ten_thousand_resamples_of_a_large_comparison_take_well_under_a_second():
    rng = np.random.default_rng(0)
    differences = {str(s): [(rng.integers(0, 2, 500) - rng.integers(0, 2, 500)).astype(float)
                            for _ in range(7)] for s in range(10)}
    start = time.perf_counter()
    compare_problems(differences)   # 10 seeds x 7 tasks x 500 problems
    assert time.perf_counter() - start < 1.0
