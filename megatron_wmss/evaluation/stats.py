"""Is model A's score higher than model B's? A paired bootstrap interval and a verdict from it.

Both reports use it: ``wmss run`` (WMSS against the SFT baseline and against the temperature
control, over seeds and held-out problems) and ``wmss eval report --baseline`` (every run
against the baseline, per task, over problems).

Method (:func:`compare_problems`). Inputs are per-problem score differences
``d = score_A − score_B`` of the same problem (paired by doc id: :func:`paired_differences`),
``[problems]`` per task, per seed. The statistic is the one the report's table shows: the mean
over seeds of the per-seed difference, a seed's difference being the mean over tasks of the
mean over problems. Each of ``n_resamples`` resamples draws the seeds with replacement and,
for every drawn seed independently, the problems of each task with replacement; the interval
is the percentile interval of the resampled statistics. With one seed only the problems are
resampled. Where per-problem results are missing, :func:`compare_seeds` resamples the per-seed
differences only. The RNG is seeded: a report is reproducible.

Scores are fractions (0..1); the reports print points (×100).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from megatron_wmss.platform.errors import UserError

__all__ = ["Comparison", "LEVEL", "N_RESAMPLES", "RNG_SEED", "bootstrap_statistics",
           "compare_problems", "compare_seeds", "paired_differences", "verdict"]

LEVEL = 0.95
N_RESAMPLES = 10_000
RNG_SEED = 0
# Resampled means of float differences carry rounding error of ~1e-16; a bound that is 0 up to
# that must read "not resolved", never "higher" or "lower".
_ZERO = 1e-9


@dataclass(frozen=True)
class Comparison:
    """A − B with its interval; scores as fractions."""

    difference: float
    """The observed statistic: mean over seeds of the per-seed difference A − B."""
    low: Optional[float]
    """Interval bounds; None when no interval can be formed (one seed, no problem rows)."""
    high: Optional[float]
    verdict: str
    """``higher`` (interval above 0), ``lower`` (below 0), or ``not resolved at 95%``."""
    method: str
    """How the interval was computed, in words."""
    n_resamples: int
    level: float
    per_seed: dict
    """``{seed: A − B}``: the difference of each seed's scores."""
    n_problems: Optional[int] = None
    """Problems per seed over all tasks (None: only per-seed scores were available)."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = [out.pop("low"), out.pop("high")]
        return out


def verdict(low: Optional[float], high: Optional[float], level: float = LEVEL) -> str:
    """The wording of an interval: an interval that touches or contains 0 is not resolved."""
    if low is not None and low > _ZERO:
        return "higher"
    if high is not None and high < -_ZERO:
        return "lower"
    return f"not resolved at {100 * level:g}%"


def paired_differences(a: Mapping[int, float], b: Mapping[int, float], *, task: str,
                       names: tuple[str, str] = ("A", "B")) -> np.ndarray:
    """``a − b`` per problem, ``[problems]`` in doc-id order, from ``{doc_id: score}`` maps.

    UserError naming ``task`` (and the two runs) when the doc ids differ: the two models must
    have been scored on the same problems.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise UserError(
            f"task {task}: {names[0]} and {names[1]} scored different problems ({len(only_a)} "
            f"doc ids only in {names[0]}{_some(only_a)}, {len(only_b)} only in "
            f"{names[1]}{_some(only_b)}); compare runs over the same data and --limit")
    if not a:
        raise UserError(f"task {task}: {names[0]} and {names[1]} scored no problems")
    ids = sorted(a)
    return np.array([float(a[i]) for i in ids]) - np.array([float(b[i]) for i in ids])


def _some(ids: list) -> str:
    return f" e.g. {ids[:3]}" if ids else ""


def bootstrap_statistics(differences: Sequence[Sequence[np.ndarray]], n_resamples: int,
                         rng: np.random.Generator) -> np.ndarray:
    """``[n_resamples]`` resampled statistics of ``differences[seed][task]`` (``[problems]``).

    Drawing n problems with replacement and averaging depends only on how often each distinct
    value was drawn, so each (resample, drawn seed, task) takes one multinomial draw over the
    task's distinct differences (at most 3 for 0/1 scores) instead of n indices: the same
    distribution, at a cost independent of the number of problems.
    """
    n_seeds = len(differences)
    picks = rng.integers(n_seeds, size=(n_resamples, n_seeds))          # [R, S] drawn seeds
    seed_means = np.zeros((n_resamples, n_seeds))                       # [R, S]
    for s, tasks in enumerate(differences):
        drawn = picks == s
        count = int(drawn.sum())
        if count == 0:
            continue
        total = np.zeros(count)
        for d in tasks:
            values, freq = np.unique(np.asarray(d, float), return_counts=True)
            counts = rng.multinomial(len(d), freq / len(d), size=count)   # [count, values]
            total += counts @ values / len(d)
        seed_means[drawn] = total / len(tasks)    # a fresh problem draw for every seed draw
    return seed_means.mean(axis=1)


def _interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _settings(n_resamples: int, level: float, seed: int) -> str:
    return (f"{100 * level:g}% percentile interval of {n_resamples:,} resamples "
            f"(numpy default_rng({seed}))")


def compare_problems(differences: Mapping[str, Sequence[np.ndarray]], *,
                     n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                     seed: int = RNG_SEED) -> Comparison:
    """A − B from ``{seed: [per-task [problems] differences]}`` by the paired bootstrap over
    seeds and problems (over problems only for one seed)."""
    if not differences:
        raise ValueError("compare_problems needs at least one seed")
    names = list(differences)
    arrays = [[np.asarray(d, float) for d in differences[k]] for k in names]
    per_seed = {k: float(np.mean([d.mean() for d in tasks])) for k, tasks in zip(names, arrays)}
    statistics = bootstrap_statistics(arrays, n_resamples, np.random.default_rng(seed))
    low, high = _interval(statistics, level)
    if len(names) > 1:
        how = (f"paired bootstrap over seeds and problems: the {len(names)} seeds resampled "
               "with replacement and, for each drawn seed, its problems resampled with "
               "replacement, both models paired on the same problem (doc id); statistic: the "
               "mean over seeds of the per-seed score difference")
    else:
        how = ("paired bootstrap over problems only (one seed per model: the seed-to-seed "
               "spread of training is not measured), both models paired on the same problem "
               "(doc id); statistic: the score difference")
    return Comparison(float(np.mean(list(per_seed.values()))), low, high,
                      verdict(low, high, level), f"{how}; {_settings(n_resamples, level, seed)}",
                      n_resamples, level, per_seed, sum(len(d) for d in arrays[0]))


def compare_seeds(per_seed: Mapping[str, float], *, reason: str,
                  n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                  seed: int = RNG_SEED) -> Comparison:
    """A − B from per-seed differences only (``reason``: why the problems are missing); the
    seeds are resampled. One seed gives no interval."""
    if not per_seed:
        raise ValueError("compare_seeds needs at least one seed")
    d = np.array([float(v) for v in per_seed.values()])
    if len(d) == 1:
        return Comparison(float(d[0]), None, None, verdict(None, None, level),
                          f"no interval: one seed, and {reason}", n_resamples, level,
                          dict(per_seed))
    rng = np.random.default_rng(seed)
    statistics = d[rng.integers(len(d), size=(n_resamples, len(d)))].mean(axis=1)
    low, high = _interval(statistics, level)
    how = (f"bootstrap over seeds only ({reason}): the {len(d)} per-seed differences "
           "resampled with replacement; problem-level noise is not resampled, and with few "
           "seeds the interval is too narrow")
    return Comparison(float(d.mean()), low, high, verdict(low, high, level),
                      f"{how}; {_settings(n_resamples, level, seed)}", n_resamples, level,
                      dict(per_seed))
