"""``wmss plan``: memory per rank and steps of every stage, from the config alone.

- :mod:`~megatron_wmss.plan.counts`: exact parameters per rank (TP, PP stage) of our GPT;
- :mod:`~megatron_wmss.plan.activations`: activations per micro-batch by layer implementation,
  recompute mode and sequence parallelism; the loss's saved tensors and workspace; KV cache;
- :mod:`~megatron_wmss.plan.memory`: weights, gradient buffers, optimizer state, and how the
  components add up to a rank's peak, for training, entropy passes and evaluation;
- :mod:`~megatron_wmss.plan.inputs`, :mod:`~megatron_wmss.plan.planner`,
  :mod:`~megatron_wmss.plan.pipeline`: recipes and ``wmss run`` configs into stages and steps;
- :mod:`~megatron_wmss.plan.report`: the table and the JSON; :mod:`~megatron_wmss.plan.cli`.

``bench/plan_check.py`` compares the planner with the measured peak of CPU runs.
"""

from megatron_wmss.plan.memory import (
    Layout,
    RankMemory,
    entropy_memory,
    eval_memory,
    training_memory,
)
from megatron_wmss.plan.pipeline import make_plan
from megatron_wmss.plan.planner import Plan, PlanOptions

__all__ = ["Layout", "Plan", "PlanOptions", "RankMemory", "entropy_memory", "eval_memory",
           "make_plan", "training_memory"]
