"""Per-model norms of what the optimizer steps: gradients and updates, strong and weak apart.

megatron's optimizer reports one norm over every parameter it steps. For a joint run the two
models' norms tell whether the weak model is what moves (WMSS re-opens the strong model's
gradients). Each norm is taken over the optimizer's main parameters and gradients (after
``prepare_grads``; this rank's shard under the distributed optimizer), with megatron's own
filter (no tensor-parallel duplicates, no second copy of a tied embedding) and its own
reduction group, so ``strong² + weak²`` is the total norm squared.

The update norm ``‖Δθ‖ = ‖θ_after − θ_before‖`` of one step is what Adam's learning rate
controls (Adam divides the gradient's scale out, so the gradient norm alone does not say how
far a step moves the model). It costs a copy of the model's main parameters held during the
step, which is why the trainer takes it only at log steps.
"""

from __future__ import annotations

import torch

from megatron_wmss.training.setup import TrainingSetup, is_weak_param

__all__ = ["UpdateNorm", "main_params_by_model", "per_model_grad_norms"]

# (model-side groups, main-side groups) attribute pairs of megatron-core 0.16's optimizers.
_GROUP_PAIRS = (
    ("float16_groups", "fp32_from_float16_groups"),  # Float16OptimizerWithFloat16Params
    ("fp32_from_fp32_groups", "fp32_from_fp32_groups"),
    ("model_float16_groups", "shard_fp32_from_float16_groups"),  # DistributedOptimizer
    ("model_fp32_groups", "shard_fp32_groups"),
)


def _model_param_of_main(optimizer) -> dict[int, object]:
    """id(main param) -> model param for one (non-chained) megatron optimizer."""
    mapping = {}
    for model_attr, main_attr in _GROUP_PAIRS:
        model_groups, main_groups = (getattr(optimizer, model_attr, None),
                                     getattr(optimizer, main_attr, None))
        if model_groups is None or main_groups is None:
            continue
        for model_group, main_group in zip(model_groups, main_groups):
            for model_param, main_param in zip(model_group, main_group):
                mapping[id(main_param)] = model_param
    if not mapping:  # FP32Optimizer: the optimizer steps the model parameters themselves
        mapping = {id(p): p for p in optimizer.get_parameters()}
    return mapping


def _optimizers(setup: TrainingSetup) -> list:
    return getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])


def main_params_by_model(setup: TrainingSetup) -> dict[str, list[torch.Tensor]]:
    """``{"strong": […], "weak": […]}`` (joint) or ``{"model": […]}`` (SFT): the main
    parameters this rank's optimizer steps, minus tensor-parallel duplicates and second copies
    of shared weights, so that summing squares over the grad-stats group counts each weight
    once."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    weak_ids = {id(p) for name, p in setup.model[0].named_parameters() if is_weak_param(name)}
    joint = setup.mix is not None
    params: dict[str, list] = {name: [] for name in (("strong", "weak") if joint else ("model",))}
    for opt in _optimizers(setup):
        to_model = _model_param_of_main(opt)
        for main in opt.get_parameters():
            if not param_is_not_shared(main) or \
                    not tensor_parallel.param_is_not_tensor_parallel_duplicate(main):
                continue
            model_param = to_model.get(id(main), main)
            name = ("weak" if id(model_param) in weak_ids else "strong") if joint else "model"
            params[name].append(main)
    return params


def _norm(tensors: list[torch.Tensor], setup: TrainingSetup) -> float:
    """The 2-norm of ``tensors`` over the optimizer's grad-stats group (collective)."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    group = _optimizers(setup)[0].get_grad_stats_parallel_group()
    return float(get_grad_norm_fp32(tensors, grad_stats_parallel_group=group))


def per_model_grad_norms(setup: TrainingSetup) -> dict[str, float]:
    """``{"strong": …, "weak": …}`` for a joint run, ``{"model": …}`` for SFT (collective over
    the optimizer's grad-stats group; call after ``prepare_grads``)."""
    return {name: _norm([p.grad for p in params if p.grad is not None], setup)
            for name, params in main_params_by_model(setup).items()}


class UpdateNorm:
    """``‖Δθ‖`` and ``‖θ‖`` of the strong (or only) model over one optimizer step.

        measure = UpdateNorm(setup)        # before the step: copies the main parameters
        optimizer.step_with_ready_grads()
        norms = measure.finish()            # {"update_norm/strong": …, "param_norm/strong": …}

    Both norms are collective over the optimizer's grad-stats group; each rank sums squares
    over its own main parameters (its shard under the distributed optimizer). The weak model
    is left out: it is not what the run delivers, and its copy would double the memory.
    """

    def __init__(self, setup: TrainingSetup) -> None:
        self._setup = setup
        params = main_params_by_model(setup)
        self._name = "model" if "model" in params else "strong"
        self._params = params[self._name]
        self._before = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """The norms after the step; frees the copy."""
        before, self._before = self._before, None
        for old, new in zip(before, self._params):
            old.sub_(new.detach())  # θ_before − θ_after, in place: no second copy
        update = _norm(before, self._setup)
        del before
        param = _norm([p.detach() for p in self._params], self._setup)
        name = self._name
        return {f"update_norm/{name}": update, f"param_norm/{name}": param,
                f"update_ratio/{name}": update / param if param > 0 else float("nan")}
