"""What a ``wmss run`` is made of: one YAML file, read into :class:`PipelineConfig`.

    run_dir: runs/demo               # everything the run writes
    base: runs/base/checkpoints      # M0: megatron checkpoint (or a run's checkpoints/) or HF dir
    seeds: 3                         # one method run (and baseline) per seed: N means
                                     # seeds 1..N; or a list, e.g. [1, 2, 3]
    iterations: 1                    # K > 1: round t trains strong M_t with weak M_{t-1}
    training: {...}                  # recipe sections every training stage shares (parallel,
                                     # optim, memory, data, tokenizer, trainer, model)
    sft: {...}                       # overrides of phase 1, the SFT baseline and SFT controls
    joint: {mix: {...}, ...}         # overrides of phase 3
    entropy: {micro_batch_size: 8}   # EntropySettings
    selection: {...}                 # SelectionConfig (its seed is each run's seed)
    eval: {tasks: [...], ...}        # EvalSettings
    controls: [temperature]          # CONTROLS run besides base / SFT / WMSS (--ablations: all)

Training stages use 1 epoch per phase (WMSS.md §5: the paper's), whatever ``training.trainer``
says; the baseline runs 1 + K epochs, the same total.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_wmss.config.recipe import (
    RecipeError,
    apply_overrides,
    build_dataclass,
    read_recipe,
    to_plain,
)

__all__ = ["CONTROLS", "EntropySettings", "EvalSettings", "PipelineConfig", "load_pipeline"]

#: The controls (issue [G]; WMSS.md §5's baseline is always run):
CONTROLS = {
    "temperature": "CE(λ·z_strong), no weak model (uniform weak logits), on the active set",
    "wdds_only": "WD-DS only: SFT epoch 2 from M1 on the active set",
    "wdjt_only": "WD-JT only: joint training on the full set",
    "sft_fresh_optimizer": "SFT epoch 2 from M1 with a fresh optimizer, full set",
    "label_smoothing": "SFT for the same epochs from the base with label smoothing",
    "frozen_weak": "WMSS with the weak model frozen",
}


@dataclass
class EntropySettings:
    """The WD-DS entropy passes."""

    micro_batch_size: int = 8
    """Samples per forward pass."""
    shard_size: int = 1024
    """Samples per resumable shard."""
    positions: str = "next-token"
    """next-token (the paper's definition) or authors (their code's logits at the answer
    tokens, header included): ``wmss entropy --positions``."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "shard_size", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size"):
            _positive(f"entropy.{name}", getattr(self, name))
        if self.positions not in ("next-token", "authors"):
            raise ValueError(f"entropy.positions must be next-token or authors, got "
                             f"{self.positions!r}")


#: eval.backend: auto is vllm where it is installed and can serve the run's models, else megatron.
EVAL_BACKENDS = ("auto", "megatron", "hf", "vllm")


@dataclass
class EvalSettings:
    """How every model of the run is evaluated (``wmss eval``, one backend for all, greedy)."""

    tasks: list = field(default_factory=lambda: ["aime25", "amc23", "gsm8k"])
    """Task names of ``wmss eval`` (``local_math``: your own file in ``data_dir``)."""
    data_dir: Optional[str] = None
    """Directory of ``<task>.jsonl`` files; null: the hub datasets (online only)."""
    limit: Optional[int] = None
    """First N problems per task (checks only)."""
    max_new_tokens: Optional[int] = None
    """Override of every task's new-token budget."""
    batch_size: int = 8
    """Loglikelihood batch."""
    generate_batch_size: int = 16
    """Prompts decoded together in one KV cache (megatron backend); 1: one by one."""
    tensor_model_parallel_size: int = 1
    seed: int = 42
    backend: str = "auto"
    """auto | megatron | hf | vllm; one for every model of the run (checkpoints are exported
    for hf/vllm, an HF base imported for megatron). auto: vllm when installed and able to serve
    the models (an HF tokenizer; on vLLM's CPU build a head_dim it supports), else megatron."""

    def __post_init__(self) -> None:
        if self.backend not in EVAL_BACKENDS:
            raise ValueError(f"eval.backend must be one of {', '.join(EVAL_BACKENDS)}, got "
                             f"{self.backend!r}")
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ValueError(f"eval.tasks must be a non-empty list, got {self.tasks!r}")
        for name in ("batch_size", "generate_batch_size", "tensor_model_parallel_size"):
            _positive(f"eval.{name}", getattr(self, name))
        for name in ("limit", "max_new_tokens"):
            if getattr(self, name) is not None:
                _positive(f"eval.{name}", getattr(self, name))


@dataclass
class PipelineConfig:
    """One ``wmss run``: paths, seeds, and the sections each stage's recipe is made from."""

    run_dir: str
    """Where everything goes: stage directories, markers (RUN_DIR/stages/), the report."""
    base: str
    """M0, the base model and the weak model of round 1."""
    training: dict
    """Recipe sections shared by every training stage (see ``wmss sft``)."""
    sft: dict = field(default_factory=dict)
    """Overrides of the SFT stages (phase 1, baseline, SFT controls)."""
    joint: dict = field(default_factory=dict)
    """Overrides of the joint stages (the mix section lives here)."""
    entropy: EntropySettings = field(default_factory=EntropySettings)
    selection: dict = field(default_factory=dict)
    """SelectionConfig fields (formula, alpha, beta, gamma, dedupe, ...); seed: each run's."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    seeds: list = field(default_factory=lambda: [1234])
    """One method run, baseline and control set per seed (trainer, data order, selection).
    An int N is the seed count: seeds 1..N."""
    iterations: int = 1
    """K: rounds of phases 2-3 (round t: strong M_t, weak M_{t-1})."""
    controls: list = field(default_factory=list)
    """Names from CONTROLS."""
    label_smoothing: float = 0.1
    """ε of the label_smoothing control."""

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            if self.seeds < 1:
                raise ValueError(f"seeds: a seed count must be >= 1, got {self.seeds}")
            self.seeds = list(range(1, self.seeds + 1))
        if not isinstance(self.seeds, list) or not self.seeds or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a seed count >= 1 or a non-empty list of ints "
                             f">= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds lists a seed twice: {self.seeds}")
        _positive("iterations", self.iterations)
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"controls: unknown {unknown}; known: {', '.join(CONTROLS)}")
        if self.controls and self.iterations != 1:
            raise ValueError("controls compare with one round of the method; run them with "
                             "iterations: 1")
        for name in ("training", "sft", "joint", "selection"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r:.60}")
        if "data" not in self.training:
            raise ValueError("training is missing the data section (data.paths: the SFT files)")
        if "seed" in self.selection:
            raise ValueError("selection.seed is each run's seed (seeds); remove it")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict:
        return to_plain(self)


_FIELDS = {"run_dir", "base", "training", "sft", "joint", "entropy", "selection", "eval",
           "seeds", "iterations", "controls", "label_smoothing"}


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def load_pipeline(path: Optional[str], overrides=(), *, run_dir: Optional[str] = None,
                  iterations: Optional[int] = None, ablations: bool = False) -> PipelineConfig:
    """Read, override (``section.field=value``) and check a ``wmss run`` config; writes
    nothing. ``ablations`` adds every control."""
    raw = read_recipe(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    for key in raw:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise RecipeError(f"unknown key {key}{hint} (valid: {', '.join(sorted(_FIELDS))})")
    if run_dir is not None:
        raw["run_dir"] = run_dir
    if iterations is not None:
        raw["iterations"] = iterations
    if ablations:
        raw["controls"] = list(CONTROLS)
    for name in ("run_dir", "base", "training"):
        if raw.get(name) is None:
            raise RecipeError(f"config is missing {name}")
    try:
        config = PipelineConfig(
            run_dir=str(raw["run_dir"]), base=str(raw["base"]), training=raw["training"],
            sft=raw.get("sft") or {}, joint=raw.get("joint") or {},
            entropy=build_dataclass(EntropySettings, raw.get("entropy"), "entropy"),
            selection=raw.get("selection") or {},
            eval=build_dataclass(EvalSettings, raw.get("eval"), "eval"),
            seeds=raw.get("seeds", [1234]), iterations=raw.get("iterations", 1),
            controls=list(raw.get("controls") or []),
            label_smoothing=raw.get("label_smoothing", 0.1))
    except ValueError as err:
        raise RecipeError(str(err)) from None
    from megatron_wmss.curriculum.select import SelectionConfig

    # Checked now, not when the first selection runs (its seed is each run's).
    build_dataclass(SelectionConfig, {**config.selection, "seed": 0}, "selection")
    _check_training_sections(config)
    if not Path(config.base).exists():
        raise RecipeError(f"base: {config.base} does not exist (the base model M0: a megatron "
                          "checkpoint, a training run's checkpoints/ directory, or an HF "
                          "directory)")
    return config


def _check_training_sections(config: PipelineConfig) -> None:
    """The sections every training stage's recipe is built from, checked now: a bad value
    fails ``--print-config`` (the Slurm preflight), not a stage hours into the run. Files and
    the architecture are checked when each stage runs (they come from earlier stages)."""
    from megatron_wmss.config import MemoryConfig, MixConfig, OptimConfig, ParallelConfig
    from megatron_wmss.data.config import DataConfig

    sections = {"data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig,
                "memory": MemoryConfig}
    for stage, extra in (("sft", config.sft), ("joint", config.joint)):
        for name, cls in {**sections, **({"mix": MixConfig} if stage == "joint" else {})}.items():
            merged = {**(config.training.get(name) or {}), **(extra.get(name) or {})}
            if name in config.training or name in extra:
                where = "training" if name not in extra else stage
                build_dataclass(cls, merged, f"{where}.{name}")
