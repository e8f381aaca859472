"""A fix for megatron-core 0.16.x's distributed optimizer resuming without TE or Apex.

Without Transformer Engine or Apex (``distrib_optimizer.HAVE_APEX_OR_TE`` is False: every CPU
machine, and GPU machines without either), megatron's distributed optimizer wraps
``torch.optim.AdamW``, which keeps a per-parameter ``state[p]["step"]`` tensor created by the
first step, and megatron's torch branches handle that layout wrongly (measured, see
``shared/notes/megatron-core-on-cpu.md``):

1. ``state_dict()`` wants one step value per parameter and fails (``assert len(steps) == 1`` or
   ``KeyError: 'step'``) on a fresh optimizer, which is what a resume calls it on;
2. ``load_state_dict()`` gives every parameter the same ``step`` tensor, which AdamW then
   increments once per parameter per step: a silently wrong bias correction after a resume;
3. ``_set_main_param_and_optimizer_states`` copies every live state key, ``step`` included,
   from the loaded tensors, which (fully reshardable format) have no ``step``: ``KeyError``;
4. the parameter-state load writes into views of leaf parameters outside ``no_grad``;
5. with empty state a load allocates on ``torch.cuda.current_device()``.

:func:`apply_distributed_optimizer_fix` wraps three methods of ``DistributedOptimizer``:
``__init__`` gives every parameter of the inner torch optimizer the state its first step would
create (fp32 step 0, zero moments: fixes 1 and 5, and changes no update), the state setter
copies every key but ``step`` (3), and ``load_state_dict`` runs under ``no_grad`` (4) and then
gives each parameter a step tensor of its own (2). It does nothing where TE or Apex is in use
(FusedAdam keeps the step in the param groups). Tested by
``tests/distributed/test_trainer_resume.py``, which resumes exactly with it and not without.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["apply_distributed_optimizer_fix", "distributed_optimizer_fix_applied"]

_APPLIED = False


def distributed_optimizer_fix_applied() -> bool:
    return _APPLIED


def _inner_torch_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def apply_distributed_optimizer_fix() -> bool:
    """Install the fix once; return whether it is installed (False where TE/Apex is used)."""
    global _APPLIED
    from megatron.core.optimizer import distrib_optimizer

    if _APPLIED:
        return True
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    cls = distrib_optimizer.DistributedOptimizer
    original_init = cls.__init__
    original_set = cls._set_main_param_and_optimizer_states
    original_load = cls.load_state_dict

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if not _inner_torch_adam(self.optimizer):
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if not state:
                    # Exactly what AdamW's first step creates (non-capturable, not fused).
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)

    @functools.wraps(original_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not _inner_torch_adam(self.optimizer):
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)  # the step is restored from the param groups, not here
        try:
            return original_set(self, model_param, {k: v for k, v in tensors.items()
                                                    if k != "step"})
        finally:
            if step is not None:
                state["step"] = step

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        with torch.no_grad():
            result = original_load(self, state_dict)
        if _inner_torch_adam(self.optimizer):
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].detach().clone()
        return result

    cls.__init__ = __init__
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict
    _APPLIED = True
    return True
