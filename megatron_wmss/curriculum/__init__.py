"""Phase 2 of WMSS, WD-DS: per-sample entropies of the weak and strong model -> active set.

    config = SelectionConfig(formula="paper", alpha=0.1, beta=0.8, gamma=0.1, seed=0)
    summary = run_select("entropy_weak.jsonl", "entropy_strong.jsonl", "select_out", config)
    # select_out/active_set.jsonl -> data.active_set of the phase-3 recipe

The weights are in :mod:`~megatron_wmss.curriculum.weights` (pure numpy), reading, drawing and
writing in :mod:`~megatron_wmss.curriculum.select`, the command in ``wmss select``.
"""

from megatron_wmss.curriculum.select import (
    ACTIVE_SET_FILE,
    SUMMARY_FILE,
    WEIGHTS_PNG,
    AlignedEntropies,
    EntropyTable,
    Selection,
    SelectionConfig,
    align_entropies,
    check_compatible,
    read_entropies,
    run_select,
    select_active_set,
)
from megatron_wmss.curriculum.weights import (
    FORMULAS,
    ZeroWeightsError,
    discrepancy_scores,
    discrepancy_weights,
)

__all__ = [
    "ACTIVE_SET_FILE",
    "FORMULAS",
    "SUMMARY_FILE",
    "WEIGHTS_PNG",
    "AlignedEntropies",
    "EntropyTable",
    "Selection",
    "SelectionConfig",
    "ZeroWeightsError",
    "align_entropies",
    "check_compatible",
    "discrepancy_scores",
    "discrepancy_weights",
    "read_entropies",
    "run_select",
    "select_active_set",
]
