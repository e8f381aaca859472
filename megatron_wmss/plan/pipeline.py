"""The plan of a ``wmss run`` config: every stage the pipeline runs, by memory column.

The stage list is ``pipeline.stages.plan_stages`` (first seed; the others repeat it), each
training stage's recipe the merge ``wmss run`` makes (``training`` sections, then the ``sft``
or ``joint`` overrides, then the stage's own epochs, active set and mix), built without the
files that earlier stages will write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_wmss.config.recipe import RecipeError, apply_overrides, read_recipe
from megatron_wmss.plan.counts import stage_parameters
from megatron_wmss.plan.inputs import (
    config_kind,
    count_rows,
    read_architecture,
    recipe_sections,
    resolve_stage_model,
    stored_chunk_bytes,
)
from megatron_wmss.plan.planner import (
    Plan,
    PlanOptions,
    plan_recipe,
    PAPER_ACTIVE_FRACTION,
    StagePlan,
    active_samples,
    checkpoint_load_bytes,
    common_notes,
    entropy_phase,
    entropy_stage,
    eval_stage,
    training_phase,
    training_stage,
)

__all__ = ["plan_run"]


def _stage_recipe(config, stage):
    from megatron_wmss.pipeline.stages import _merge

    p = stage.params
    fixed: dict = {"trainer": {"epochs": p.get("epochs", 1)}}
    if p.get("loss"):
        fixed["loss"] = p["loss"]
    if p.get("mix"):
        fixed["mix"] = p["mix"]
    extra = config.sft if stage.kind == "sft" else config.joint
    return recipe_sections(stage.kind, _merge(config.training, extra, fixed))


def plan_run(config_path: str, overrides: list, options: PlanOptions) -> Plan:
    """The plan of every stage of a ``wmss run`` config (see the module docstring)."""
    from megatron_wmss.pipeline.config import load_pipeline
    from megatron_wmss.pipeline.stages import plan_stages

    extra = []
    if options.model is not None:
        extra = [f"base={options.model}"]  # the architecture; the real base may be elsewhere
    try:
        config = load_pipeline(config_path, list(overrides) + extra)
    except RecipeError as err:
        if options.model is None and "base:" in str(err):
            raise RecipeError(f"{err}; to plan without it, pass --model (an HF config.json or "
                              "a megatron checkpoint of the same architecture)") from None
        raise
    base = read_architecture(options.model or config.base)
    stages = [s for s in plan_stages(config) if s.seed in (0, config.seeds[0])]
    recipes = {s.id: _stage_recipe(config, s) for s in stages if s.kind in ("sft", "joint")}
    first = next(r for r in recipes.values() if r.command == "sft")
    cfg = resolve_stage_model(base, first.model_overrides, "training")
    world = options.world_size or max(
        [r.parallel.tensor_model_parallel_size * r.parallel.pipeline_model_parallel_size
         for r in recipes.values()]
        + [config.entropy.tensor_model_parallel_size
           * config.entropy.pipeline_model_parallel_size,
           config.eval.tensor_model_parallel_size])
    if options.samples is not None:
        samples, where = options.samples, "--samples"
    else:
        samples = count_rows(first.data.paths)
        where = "rows in the data files" if samples is not None else \
            "unknown (data not here: pass --samples N)"
    plan = Plan(config_path, "run", world, options.target, options.gpu_memory, cfg, samples,
                where)
    from megatron_wmss.curriculum.select import SelectionConfig

    dedupe = SelectionConfig(**config.selection, seed=0).dedupe
    active = active_samples(samples, dedupe, options)
    load = 0
    if options.target == "cpu":
        load = checkpoint_load_bytes(cfg, stored_chunk_bytes(config.base), [
            r.parallel.tensor_model_parallel_size for r in recipes.values()])
    columns: dict[str, StagePlan] = {}
    for stage in stages:
        name = stage.id.split("/", 1)[1]
        if stage.kind in ("sft", "joint"):
            recipe = recipes[stage.id]
            model = resolve_stage_model(base, recipe.model_overrides,
                                        "training" if stage.kind == "sft" else stage.kind)
            frozen = bool(recipe.mix and recipe.mix.freeze_weak)
            column = stage.kind + (" (frozen weak)" if frozen else "")
            if column not in columns:
                columns[column] = training_stage(column, recipe, model, world, options, frozen,
                                                 load)
            n = active if stage.params.get("active_set") else samples
            plan.phases.append(training_phase(name, column, recipe, n,
                                               columns[column].layout.dp))
        elif stage.kind == "entropy":
            if "entropy" not in columns:
                columns["entropy"] = entropy_stage(cfg, config.entropy, first.data, world,
                                                   options, load)
            plan.phases.append(entropy_phase(
                name, samples, config.entropy.micro_batch_size,
                columns["entropy"].layout.dp, first.data.row_length))
        elif stage.kind == "eval" and "eval" not in columns:
            columns["eval"] = eval_stage(cfg, config.eval, world, options, load)
    order = ("sft", "entropy", "joint", "joint (frozen weak)", "eval")
    plan.stages = [columns[k] for k in order if k in columns]
    if samples is not None:
        why = ("--active-fraction" if options.active_fraction is not None else
               "the paper's unique share after de-duplication; pass --active-fraction F"
               if dedupe else "no de-duplication: as many draws as samples")
        plan.notes.append(f"phase 3 and the active-set controls train on {active} samples "
                          f"({active / samples:.0%} of the data: {why})")
    from megatron_wmss.pipeline.cost import predicted_cost_ratio

    fraction = options.active_fraction or (PAPER_ACTIVE_FRACTION if dedupe else 1.0)
    frozen = bool((config.joint.get("mix") or {}).get("freeze_weak", False))
    plan.cost = {"ratio": predicted_cost_ratio(config.iterations,
                                               [fraction] * config.iterations, frozen),
                 "active_fraction": fraction, "iterations": config.iterations,
                 "freeze_weak": frozen}
    base_dir = Path(config.base)  # with --model only an architecture: no note
    if options.model is None and (base_dir / "config.json").is_file() \
            and not (base_dir / "metadata.json").is_file():
        full = stage_parameters(base, 1, 1, 0).total * (2 if base.params_dtype != "float32"
                                                       else 4)
        plan.notes.append(
            f"the base is an HF directory: the stages that read it (entropy of M0, phase 1, "
            f"the baseline, the weak model of round 1, its evaluation) import it first, each "
            f"rank holding the whole HF model ({full / 2**30:.2f} GiB) in host memory besides "
            "what is planned here; `wmss import-hf --tp N` once and base: the checkpoint "
            "avoids it")
    if len(config.seeds) > 1:
        plan.notes.append(f"steps are per seed; the run repeats them for {len(config.seeds)} "
                          "seeds")
    common_notes(plan, options)
    return plan


def make_plan(config_path: str, overrides=(), options: Optional[PlanOptions] = None,
              kind: Optional[str] = None) -> Plan:
    """Plan ``config_path`` (a recipe or a ``wmss run`` config) with ``key=value`` overrides."""
    options = options or PlanOptions()
    raw = apply_overrides(read_recipe(config_path), list(overrides))
    kind = kind or config_kind(raw)
    if kind == "run":
        return plan_run(config_path, list(overrides), options)
    return plan_recipe(config_path, raw, kind, options)
