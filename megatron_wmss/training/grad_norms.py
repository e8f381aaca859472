"""Gradient norms of the strong and the weak model separately, as the optimizer sees them.

megatron's optimizer reports one norm over every parameter it steps. For a joint run the two
models' norms tell whether the weak model is what moves (WMSS re-opens the strong model's
gradients). Each norm is taken over the optimizer's main gradients (after ``prepare_grads``),
with megatron's own filter (no tensor-parallel duplicates, no second copy of a tied
embedding) and its own reduction group, so ``strong² + weak²`` is the total norm squared.
"""

from __future__ import annotations

from megatron_wmss.training.setup import TrainingSetup, is_weak_param

__all__ = ["per_model_grad_norms"]

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


def per_model_grad_norms(setup: TrainingSetup) -> dict[str, float]:
    """``{"strong": …, "weak": …}`` for a joint run, ``{"model": …}`` for SFT (collective over
    the optimizer's grad-stats group; call after ``prepare_grads``)."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.transformer.module import param_is_not_shared

    weak_ids = {id(p) for name, p in setup.model[0].named_parameters() if is_weak_param(name)}
    joint = setup.mix is not None
    names = ("strong", "weak") if joint else ("model",)
    grads: dict[str, list] = {name: [] for name in names}
    optimizers = getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])
    for opt in optimizers:
        to_model = _model_param_of_main(opt)
        for main in opt.get_parameters():
            if main.grad is None or not param_is_not_shared(main) or \
                    not tensor_parallel.param_is_not_tensor_parallel_duplicate(main):
                continue
            model_param = to_model.get(id(main), main)
            name = ("weak" if id(model_param) in weak_ids else "strong") if joint else "model"
            grads[name].append(main.grad)
    group = optimizers[0].get_grad_stats_parallel_group()
    return {name: float(get_grad_norm_fp32(grads[name], grad_stats_parallel_group=group))
            for name in names}
