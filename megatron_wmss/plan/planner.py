"""``make_plan``: the stages of a recipe or a ``wmss run`` config, each with its layout, its
memory per rank (:mod:`megatron_wmss.plan.memory`) and its steps.

A ``wmss sft|joint`` recipe is one stage. A ``wmss run`` config is every stage the pipeline
runs (``pipeline.stages.plan_stages``), each with the recipe ``wmss run`` builds for it (the
shared ``training`` sections and the ``sft``/``joint`` overrides): phase 1 SFT, the entropy
passes, joint training, the SFT baseline, the controls, the evaluations. Stages with the same
models and layout share one memory column (phase 1, the baseline and the SFT controls are one
"sft" column). Phase 3 trains on the selection's unique samples, which are not known before
the entropies exist: ``active_fraction`` of the data (the paper: ~0.56 with de-duplication;
without it the active set has as many entries as the data).

Target: ``gpu`` plans Transformer Engine layers (unless the recipe forces the local spec),
the automatic memory choices of a CUDA machine and a fused Adam; ``cpu`` plans what a CPU run
here does (local spec, torch's AdamW, the distributed optimizer off unless set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_wmss.config import ModelConfig, ParallelConfig
from megatron_wmss.config.recipe import RecipeError
from megatron_wmss.plan.inputs import (
    count_rows,
    read_architecture,
    recipe_sections,
    resolve_stage_model,
    stored_chunk_bytes,
)
from megatron_wmss.plan.counts import stage_parameters
from megatron_wmss.plan.memory import (
    Layout,
    RankMemory,
    entropy_memory,
    eval_memory,
    training_memory,
)

__all__ = ["FIT_FRACTION", "PAPER_ACTIVE_FRACTION", "PhaseSteps", "Plan", "PlanOptions",
           "StagePlan", "plan_recipe"]

#: A stage "fits" below this fraction of the GPU's memory: the rest is for what is not
#: modelled (CUDA context, NCCL buffers, allocator fragmentation); up to 1.0 it is "tight".
FIT_FRACTION = 0.85
#: Unique share of the active set the paper reports after de-duplication (~56% of the steps).
PAPER_ACTIVE_FRACTION = 0.56
TARGETS = ("gpu", "cpu")


@dataclass
class PlanOptions:
    """What the command line adds to the config."""

    world_size: Optional[int] = None
    """Ranks of the job; None: the smallest that fits every stage's TP x PP (DP = 1)."""
    gpu_memory: int = 80 * 2**30
    """Bytes of memory per GPU the verdict compares with."""
    target: str = "gpu"
    model: Optional[str] = None
    """HF config.json / megatron checkpoint giving the architecture."""
    samples: Optional[int] = None
    """Data rows, when the data files are not here."""
    active_fraction: Optional[float] = None
    """Share of the data in phase 3's active set; None: the paper's with dedupe, else 1."""
    eval_prompt_tokens: int = 1024
    """Longest evaluation prompt the KV cache is sized for (plus the generation budget)."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {self.target!r}")
        for name in ("world_size", "samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.active_fraction is not None and not 0 < self.active_fraction <= 1:
            raise ValueError(f"active fraction must be in (0, 1], got {self.active_fraction}")
        if self.gpu_memory <= 0 or self.eval_prompt_tokens < 1:
            raise ValueError("gpu memory and evaluation prompt tokens must be positive")


@dataclass
class StagePlan:
    """One memory column: a kind of stage at its layout."""

    name: str
    kind: str
    """sft | joint | entropy | eval"""
    layout: Layout
    settings: dict
    ranks: list[RankMemory]

    @property
    def peak(self) -> int:
        return max(r.total for r in self.ranks)


@dataclass
class PhaseSteps:
    """Work of one stage of the run: samples, micro-batches and optimizer steps."""

    name: str
    stage: str
    """The memory column it runs in."""
    samples: Optional[int]
    epochs: int = 1
    microbatches_per_step: Optional[int] = None
    """Per data-parallel rank (training), or micro-batches per rank for the whole pass."""
    steps: Optional[int] = None
    """Optimizer steps (training); None for forward-only passes."""
    tokens: Optional[int] = None
    """At most this many tokens (every row at its longest)."""


@dataclass
class Plan:
    """Everything ``wmss plan`` reports (:mod:`megatron_wmss.plan.report` prints it)."""

    config: str
    kind: str
    """sft | joint | run"""
    world_size: int
    target: str
    gpu_memory: int
    model: ModelConfig
    """The planned architecture and dtype (phase 1's model for a run config)."""
    samples: Optional[int]
    samples_source: str
    """Where ``samples`` came from (the data files, --samples), or why it is unknown."""
    stages: list[StagePlan] = field(default_factory=list)
    phases: list[PhaseSteps] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: Optional[dict] = None
    """``wmss run`` configs: the WMSS arm's cost over the SFT baseline's predicted from FLOPs
    (``ratio``), for phase 3's ``active_fraction`` (``pipeline/cost.predicted_cost_ratio``)."""

    def verdict(self, stage: StagePlan) -> str:
        """fits (≤ FIT_FRACTION of the GPU), tight (≤ 100%) or does not fit."""
        share = stage.peak / self.gpu_memory
        if share <= FIT_FRACTION:
            return "fits"
        return "tight" if share <= 1.0 else "does not fit"


def _layout(tp: int, pp: int, world: int, sp: bool, where: str) -> Layout:
    if world % (tp * pp):
        raise RecipeError(f"{where}: world size {world} is not a multiple of TP x PP = "
                          f"{tp} x {pp}; pass --world-size (or --nodes) a multiple of {tp * pp}")
    return Layout(tp, pp, world // (tp * pp), sp)


def _impl(cfg: ModelConfig, target: str) -> str:
    return "te" if target == "gpu" and cfg.transformer_impl != "local" else "local"


def training_stage(name: str, recipe, cfg: ModelConfig, world: int, options: PlanOptions,
                   frozen: bool, load_bytes: int = 0) -> StagePlan:
    """The memory column of a training recipe (``models`` and choices from the recipe, the
    null memory settings resolved for the target)."""
    cfg.check_parallel(recipe.parallel)
    par = recipe.parallel
    layout = _layout(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, world,
                     par.sequence_parallel, name)
    gpu = options.target == "gpu"
    memory = recipe.memory.resolved(gpu)
    micro = recipe.num_microbatches(layout.dp)
    seq = recipe.data.row_length
    models = 2 if recipe.joint else 1
    impl = _impl(cfg, options.target)
    ranks = training_memory(
        cfg, layout, recompute=memory.recompute, cross_entropy=memory.cross_entropy_impl,
        distributed_optimizer=memory.distributed_optimizer,
        micro_batch_size=recipe.data.micro_batch_size, seq_length=seq, num_microbatches=micro,
        models=models, freeze_weak=frozen, impl=impl, gpu=gpu,
        update_norm=recipe.trainer.log_update_norm,
        chunk_tokens=memory.cross_entropy_chunk_tokens, load_bytes=load_bytes)
    settings = {"params_dtype": cfg.params_dtype, "layers": impl, "models": models,
                "freeze_weak": frozen, "micro_batch_size": recipe.data.micro_batch_size,
                "seq_length": seq, "microbatches_per_step": micro,
                "recompute": memory.recompute, "cross_entropy": memory.cross_entropy_impl,
                "distributed_optimizer": memory.distributed_optimizer,
                "update_norm_copy": recipe.trainer.log_update_norm, "fp8": cfg.fp8}
    return StagePlan(name, recipe.command, layout, settings, ranks)


def training_phase(name: str, column: str, recipe, samples: Optional[int], dp: int
                   ) -> PhaseSteps:
    """Steps of a training recipe over ``samples``, as its trainer counts them (a global
    batch's remainder dropped, ``trainer.epochs`` and ``train_steps`` applied)."""
    micro = recipe.num_microbatches(dp)
    if samples is None:
        return PhaseSteps(name, column, None, recipe.trainer.epochs, micro)
    steps = recipe.total_steps(samples)
    tokens = steps * recipe.trainer.global_batch_size * recipe.data.row_length
    return PhaseSteps(name, column, samples, recipe.trainer.epochs, micro, steps, tokens)


def plan_recipe(config_path: str, raw: dict, kind: str, options: PlanOptions) -> Plan:
    """Plan a ``wmss sft|joint`` recipe (``raw``: read, overrides applied)."""
    recipe = recipe_sections(kind, raw)
    here = [p for p in recipe.init_paths().values() if p is not None and Path(p).exists()]
    source = options.model or next(iter(here), None)
    base = read_architecture(source) if source is not None else None
    vocab = None
    if base is None and "vocab_size" not in recipe.model_overrides and recipe.tokenizer:
        from megatron_wmss.data import load_tokenizer

        vocab = load_tokenizer(recipe.tokenizer).vocab_size
    cfg = resolve_stage_model(base, recipe.model_overrides, "", vocab)
    par = recipe.parallel
    world = options.world_size or (par.tensor_model_parallel_size
                                   * par.pipeline_model_parallel_size)
    samples, where = _samples(recipe.data, options)
    if recipe.data.active_set is not None and options.samples is None:
        from megatron_wmss.data.sampler import read_active_set

        try:
            samples, where = len(read_active_set(recipe.data.active_set)), "active set file"
        except FileNotFoundError:
            pass
    frozen = bool(recipe.mix and recipe.mix.freeze_weak)
    load = 0
    if options.target == "cpu":
        load = max([stored_chunk_bytes(p) or 0 for p in here] or [0])
    stage = training_stage(kind, recipe, cfg, world, options, frozen, load)
    plan = Plan(config_path, kind, world, options.target, options.gpu_memory, cfg, samples,
                where, [stage])
    plan.phases.append(training_phase(kind, kind, recipe, samples, stage.layout.dp))
    common_notes(plan, options)
    return plan


def _samples(data, options: PlanOptions) -> tuple[Optional[int], str]:
    if options.samples is not None:
        return options.samples, "--samples"
    rows = count_rows(data.paths)
    if rows is None:
        return None, "unknown (data not here: pass --samples N)"
    return rows, "rows in the data files"


def common_notes(plan: Plan, options: PlanOptions) -> None:
    """What a reader of the plan should know about its inputs and its limits."""
    if options.world_size is None:
        plan.notes.append(f"world size not given: planned for {plan.world_size} ranks "
                          "(DP = 1); pass --world-size N or --nodes N")
    if plan.samples is None:
        plan.notes.append("data size unknown: steps need --samples N")
    if any(s.settings.get("fp8") for s in plan.stages):
        plan.notes.append("FP8: activations and weights are counted in bf16 (Transformer "
                          "Engine keeps some linear inputs in 1 byte: an upper bound), its "
                          "per-step FP8 weight copies are not counted")
    if any(s.settings.get("seq_length") and s.kind in ("sft", "joint") for s in plan.stages):
        plan.notes.append("activations are for a micro-batch at its longest (data.max_length "
                          "rounded to pad_to_multiple_of); shorter samples need less")
    if options.target == "gpu":
        plan.notes.append(f"verdict: fits up to {FIT_FRACTION:.0%} of --gpu-memory (CUDA "
                          "context, NCCL buffers and allocator fragmentation are not counted)")


def checkpoint_load_bytes(cfg: ModelConfig, base_chunk: Optional[int], tps: list[int]) -> int:
    """The CPU load transient of a run's stages (:mod:`megatron_wmss.plan.memory`): the largest
    chunk of the base checkpoint (``base_chunk``, from its metadata) or of a checkpoint the run
    writes at one of its training tensor-parallel sizes ``tps`` (extraction saves at the joint
    stage's layout)."""
    e = 4 if cfg.params_dtype == "float32" else 2
    written = max(e * stage_parameters(cfg, tp, 1, 0).largest for tp in tps)
    return max(base_chunk or 0, written)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def entropy_stage(cfg: ModelConfig, settings, data, world: int, options: PlanOptions,
                  load_bytes: int = 0) -> StagePlan:
    """The entropy pass's memory column (``wmss run``'s EntropySettings layout)."""
    tp, pp = settings.tensor_model_parallel_size, settings.pipeline_model_parallel_size
    layout = _layout(tp, pp, world, False, "entropy")
    impl = _impl(cfg, options.target)
    ranks = entropy_memory(cfg, layout, micro_batch_size=settings.micro_batch_size,
                           seq_length=data.row_length, impl=impl,
                           gpu=options.target == "gpu", load_bytes=load_bytes)
    return StagePlan("entropy", "entropy", layout, {
        "params_dtype": cfg.params_dtype, "layers": impl,
        "micro_batch_size": settings.micro_batch_size, "seq_length": data.row_length,
        "forward_only": True}, ranks)


def entropy_phase(name: str, samples: Optional[int], micro: int, dp: int, row_length: int
                  ) -> PhaseSteps:
    """A forward-only pass over every sample: micro-batches per data-parallel rank."""
    if samples is None:
        return PhaseSteps(name, "entropy", None)
    per_rank = _ceil_div(_ceil_div(samples, dp), micro)
    return PhaseSteps(name, "entropy", samples, 1, per_rank, None, samples * row_length)


def eval_stage(cfg: ModelConfig, settings, world: int, options: PlanOptions,
               load_bytes: int = 0) -> StagePlan:
    """The evaluation column: batched greedy decoding with the longest task budget."""
    from megatron_wmss.evaluation.benchmarks import get_task

    new = settings.max_new_tokens or max(get_task(t).max_gen_toks for t in settings.tasks)
    tp = settings.tensor_model_parallel_size
    layout = _layout(tp, 1, world, False, "eval")
    cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    impl = _impl(cfg, options.target)
    rank = eval_memory(cfg, tp, batch=settings.generate_batch_size,
                       prompt_tokens=options.eval_prompt_tokens, new_tokens=new, impl=impl,
                       gpu=options.target == "gpu", load_bytes=load_bytes)
    longest = min(cfg.max_position_embeddings, options.eval_prompt_tokens + new)
    return StagePlan("eval", "eval", layout, {
        "params_dtype": cfg.params_dtype, "layers": impl,
        "generate_batch_size": settings.generate_batch_size, "max_new_tokens": new,
        "prompt_tokens": options.eval_prompt_tokens, "kv_tokens": longest}, [rank])


def active_samples(samples: Optional[int], dedupe: bool, options: PlanOptions
                   ) -> Optional[int]:
    """Phase 3's active-set size for ``samples`` rows."""
    if samples is None:
        return None
    fraction = options.active_fraction
    if fraction is None:
        fraction = PAPER_ACTIVE_FRACTION if dedupe else 1.0
    return max(1, math.floor(samples * fraction))
