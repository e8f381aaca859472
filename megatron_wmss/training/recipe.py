"""What a ``wmss sft`` / ``wmss joint`` run is made of: the recipe's sections as dataclasses.

    run_dir: runs/tiny-sft          # everything the run writes (default: trainer.run_dir)
    model: {...}                    # ModelConfig; from the init checkpoint when one is given
    parallel: {...}                 # ParallelConfig
    optim: {...}                    # OptimConfig
    mix: {...}                      # MixConfig (joint runs only)
    loss: {...}                     # SFTLossConfig (sft runs only: the ablation controls)
    memory: {...}                   # MemoryConfig
    data: {...}                     # DataConfig
    tokenizer: {...}                # TokenizerConfig; from the init checkpoint when it has one
    trainer: {...}                  # TrainerConfig
    init: {model: CKPT}             # sft: megatron checkpoint or HF directory, or null (random)
    init: {strong: CKPT, weak: CKPT}  # joint (either may be null: random)

``load_recipe`` reads the YAML, applies ``key.sub=value`` overrides and checks everything that
can be checked without a model: types, ranges, unknown keys, that data, tokenizer and init
checkpoints exist, that the batch sizes divide. It writes nothing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_wmss.config import (
    MixConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SFTLossConfig,
)
from megatron_wmss.config.recipe import (
    RecipeError,
    apply_overrides,
    build_dataclass,
    read_recipe,
    to_plain,
)
from megatron_wmss.config.training import MemoryConfig
from megatron_wmss.data.config import DataConfig, TokenizerConfig

__all__ = ["COMMANDS", "InitConfig", "Recipe", "TrainerConfig", "check_init_architectures",
           "build_recipe", "default_tokenizer", "load_recipe", "resolve_model"]

#: What each command trains.
COMMANDS = ("sft", "joint")


@dataclass
class TrainerConfig:
    """The training loop: length, checkpoints, logging, preemption."""

    run_dir: str = "runs/wmss"
    """Directory of everything the run writes (config, checkpoints, metrics.jsonl, tb/)."""
    epochs: int = 1
    """Passes over the data (paper: 1 per phase)."""
    train_steps: Optional[int] = None
    """Stop after this many optimizer steps; null: the steps the epochs make."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (paper: 512)."""
    save_interval: int = 0
    """Save a full training checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in RUN_DIR/checkpoints (the newest; older ones are deleted)."""
    log_interval: int = 1
    """Write metrics (and, for joint runs, the saturation diagnostics) every N steps."""
    log_update_norm: bool = True
    """At log steps, also log how far the step moved the strong (or only) model:
    ``update_norm/<strong|model>`` = ‖θ_after − θ_before‖, ``param_norm/…``, ``update_ratio/…``.
    Costs one copy of that model's main parameters (fp32, this rank's shard) during those
    steps' optimizer update; turn off where that memory is not there."""
    exit_duration_minutes: Optional[float] = None
    """Save and exit (preemption exit code) after this much wall time, as Megatron-LM does."""
    max_nonfinite_steps: int = 3
    """A non-finite loss or gradient norm skips the step; this many in a row stops the run."""
    seed: int = 1234
    """Seed of fresh weights (models without an init checkpoint) and of the RNG streams."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tb."""
    wandb_project: Optional[str] = None
    """Log to Weights & Biases under this project when wandb is installed; null: off."""
    progress_bar: bool = True
    """A progress bar on rank 0 (stderr)."""

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("global_batch_size", 1), ("save_interval", 0),
                          ("keep_last", 1), ("log_interval", 1), ("max_nonfinite_steps", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"trainer.{name} must be an int >= {low}, got {value!r}")
        if self.train_steps is not None and (isinstance(self.train_steps, bool)
                                             or self.train_steps < 1):
            raise ValueError(f"trainer.train_steps must be null or >= 1, got {self.train_steps!r}")
        if self.exit_duration_minutes is not None and not self.exit_duration_minutes > 0:
            raise ValueError("trainer.exit_duration_minutes must be null or > 0, got "
                             f"{self.exit_duration_minutes!r}")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"trainer.run_dir must be a non-empty path, got {self.run_dir!r}")


@dataclass
class InitConfig:
    """Where the weights come from: megatron checkpoints or HF directories; null is random."""

    model: Optional[str] = None
    """sft: the model to fine-tune (the base model, M0)."""
    strong: Optional[str] = None
    """joint: the strong model (phase 1's output, M1)."""
    weak: Optional[str] = None
    """joint: the weak model (the base, M0)."""


@dataclass
class Recipe:
    """A whole run, resolved. ``model`` is None until :func:`resolve_model` fills it."""

    command: str
    data: DataConfig
    model: Optional[ModelConfig] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mix: Optional[MixConfig] = None
    loss: SFTLossConfig = field(default_factory=SFTLossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tokenizer: Optional[TokenizerConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model_overrides: dict = field(default_factory=dict, repr=False)
    """The recipe's ``model`` section, applied by :func:`resolve_model`."""

    @property
    def joint(self) -> bool:
        return self.command == "joint"

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.run_dir)

    def init_paths(self) -> dict[str, Optional[str]]:
        """``{"model": …}`` for sft, ``{"strong": …, "weak": …}`` for joint."""
        if self.joint:
            return {"strong": self.init.strong, "weak": self.init.weak}
        return {"model": self.init.model}

    def to_dict(self) -> dict:
        """The resolved recipe (what RUN_DIR/config.yaml holds)."""
        out = to_plain(self)
        out.pop("model_overrides")
        if self.joint:
            out.pop("loss")
        return out

    def steps_per_epoch(self, num_samples: int) -> int:
        """Optimizer steps in one epoch of ``num_samples``: the remainder that does not fill a
        global batch is dropped (every rank then runs the same number of micro-batches)."""
        steps = num_samples // self.trainer.global_batch_size
        if steps == 0:
            raise RecipeError(f"{num_samples} samples do not fill one global batch of "
                              f"trainer.global_batch_size={self.trainer.global_batch_size}")
        return steps

    def num_microbatches(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        per_step = self.data.micro_batch_size * dp_size
        if self.trainer.global_batch_size % per_step:
            raise RecipeError(
                f"trainer.global_batch_size={self.trainer.global_batch_size} must be a multiple "
                f"of data.micro_batch_size x data-parallel size = {self.data.micro_batch_size} x "
                f"{dp_size}")
        return self.trainer.global_batch_size // per_step

    def total_steps(self, num_samples: int) -> int:
        steps = self.trainer.epochs * self.steps_per_epoch(num_samples)
        if self.trainer.train_steps is not None:
            steps = min(steps, self.trainer.train_steps)
        return steps


_SECTIONS = {"model", "parallel", "optim", "mix", "loss", "memory", "data", "tokenizer",
             "trainer", "init", "run_dir"}


def load_recipe(command: str, path: Optional[str], overrides=(), run_dir: Optional[str] = None
                ) -> Recipe:
    """Read, override and check a recipe for ``command`` (sft | joint). Writes nothing."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {list(COMMANDS)}, got {command!r}")
    raw = read_recipe(path) if path else {}
    return build_recipe(command, apply_overrides(raw, list(overrides)), run_dir)


def build_recipe(command: str, raw: dict, run_dir: Optional[str] = None) -> Recipe:
    """:func:`load_recipe` from an already-read mapping (``wmss run`` builds one per stage)."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {list(COMMANDS)}, got {command!r}")
    for key in raw:
        if key not in _SECTIONS:
            close = difflib.get_close_matches(str(key), sorted(_SECTIONS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise RecipeError(f"unknown key {key}{hint} (valid sections: "
                              f"{', '.join(sorted(_SECTIONS))})")
    trainer_raw = dict(raw.get("trainer") or {})
    if "run_dir" in raw:  # a top-level shortcut for trainer.run_dir
        trainer_raw["run_dir"] = raw["run_dir"]
    if run_dir is not None:
        trainer_raw["run_dir"] = run_dir
    if "data" not in raw:
        raise RecipeError("recipe is missing the data section (data.paths: the SFT files)")
    if not isinstance(raw.get("model") or {}, dict):
        raise RecipeError(f"model must be a mapping of ModelConfig fields, got "
                          f"{raw['model']!r:.60}")
    if command == "sft" and raw.get("mix") is not None:
        raise RecipeError("mix applies to joint runs only; remove it from an sft recipe")
    if command == "joint" and raw.get("loss") is not None:
        raise RecipeError("loss (logit_scale, label_smoothing) applies to sft runs only; a "
                          "joint run trains on the mixed cross-entropy (mix section)")
    recipe = Recipe(
        command=command,
        data=build_dataclass(DataConfig, raw["data"], "data"),
        parallel=build_dataclass(ParallelConfig, raw.get("parallel"), "parallel"),
        optim=build_dataclass(OptimConfig, raw.get("optim"), "optim"),
        mix=build_dataclass(MixConfig, raw.get("mix"), "mix") if command == "joint" else None,
        loss=build_dataclass(SFTLossConfig, raw.get("loss"), "loss"),
        memory=build_dataclass(MemoryConfig, raw.get("memory"), "memory"),
        tokenizer=(build_dataclass(TokenizerConfig, raw["tokenizer"], "tokenizer")
                   if raw.get("tokenizer") is not None else None),
        trainer=build_dataclass(TrainerConfig, trainer_raw, "trainer"),
        init=build_dataclass(InitConfig, raw.get("init"), "init"),
        model_overrides=dict(raw.get("model") or {}),
    )
    _check_init(recipe)
    from megatron_wmss.platform import cuda_available

    try:
        recipe.memory.resolved(cuda_available())
    except ValueError as err:
        raise RecipeError(str(err)) from None
    _check_files(recipe)
    tp = recipe.parallel.tensor_model_parallel_size
    if recipe.parallel.sequence_parallel and recipe.data.pad_to_multiple_of % tp:
        raise RecipeError(f"parallel.sequence_parallel=true splits every row over the "
                          f"{tp} tensor-parallel ranks: data.pad_to_multiple_of="
                          f"{recipe.data.pad_to_multiple_of} must be a multiple of "
                          f"parallel.tensor_model_parallel_size={tp}")
    if recipe.parallel.pipeline_model_parallel_size > 1 and not (
            recipe.data.pad_to_max_length or recipe.data.pack_sequences):
        raise RecipeError("parallel.pipeline_model_parallel_size > 1 needs data.pad_to_max_length"
                          "=true or data.pack_sequences=true (pipeline stages exchange "
                          "fixed-shape activations)")
    return recipe


def _check_init(recipe: Recipe) -> None:
    init = recipe.init
    if recipe.joint and init.model is not None:
        raise RecipeError("init.model is for sft runs; a joint run takes init.strong and "
                          "init.weak")
    if not recipe.joint and (init.strong is not None or init.weak is not None):
        raise RecipeError("init.strong / init.weak are for joint runs; an sft run takes "
                          "init.model")


def _check_files(recipe: Recipe) -> None:
    for name, path in recipe.init_paths().items():
        if path is not None and not Path(path).exists():
            raise RecipeError(f"init.{name}: checkpoint {path} does not exist")
    from megatron_wmss.data.sources import resolve_paths

    try:
        resolve_paths(recipe.data.paths)
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(f"data.paths: {err}") from None
    if recipe.data.active_set is not None and not Path(recipe.data.active_set).is_file():
        raise RecipeError(f"data.active_set: file {recipe.data.active_set} does not exist")
    if recipe.tokenizer is not None and not Path(recipe.tokenizer.path).exists():
        raise RecipeError(f"tokenizer.path: {recipe.tokenizer.path} does not exist (a local "
                          "SentencePiece .model file or HF tokenizer directory)")


def resolve_model(recipe: Recipe, tokenizer_vocab: int) -> Recipe:
    """Fill ``recipe.model``: from the init checkpoint(s) when there are any, with the recipe's
    ``model`` section applied on top (architecture fields must then agree), else from the
    ``model`` section alone, its ``vocab_size`` defaulting to the tokenizer's."""
    from megatron_wmss.config import ARCHITECTURE_FIELDS

    overrides = dict(recipe.model_overrides)
    check_init_architectures(recipe)
    stored = [(name, _stored_model_config(path)) for name, path in recipe.init_paths().items()
              if path is not None]
    if stored:
        first_name, base = stored[0]
        merged = {**to_plain(base), **overrides}
        cfg = build_dataclass(ModelConfig, merged, "model")
        for name in ARCHITECTURE_FIELDS:
            if getattr(cfg, name) != getattr(base, name):
                raise RecipeError(f"model.{name}={getattr(cfg, name)!r} differs from the init "
                                  f"checkpoint's {getattr(base, name)!r} (init.{first_name})")
    else:
        if not overrides:
            raise RecipeError("recipe needs a model section (no init checkpoint to take the "
                              "architecture from)")
        overrides.setdefault("vocab_size", tokenizer_vocab)
        cfg = build_dataclass(ModelConfig, overrides, "model")
    if cfg.vocab_size < tokenizer_vocab:
        raise RecipeError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} tokens")
    try:
        cfg.check_parallel(recipe.parallel)
    except ValueError as err:
        raise RecipeError(f"parallel: {err}") from None
    recipe.model = cfg
    return recipe


def check_init_architectures(recipe: Recipe) -> None:
    """The init checkpoints describe one architecture (joint: strong and weak); cheap, reads
    only their descriptions."""
    from megatron_wmss.config import check_same_architecture

    stored = [(name, _stored_model_config(path)) for name, path in recipe.init_paths().items()
              if path is not None]
    for (name_a, a), (name_b, b) in zip(stored, stored[1:]):
        try:
            check_same_architecture(a, b)
        except ValueError as err:
            raise RecipeError(f"init.{name_a} and init.{name_b}: {err}") from None


def _stored_model_config(path: str) -> ModelConfig:
    """The ModelConfig a megatron checkpoint (its wmss_model.json) or HF directory describes."""
    from megatron_wmss.interop import read_model_metadata
    from megatron_wmss.interop.hf_config import model_config_from_hf
    from megatron_wmss.interop.hf_io import read_json

    directory = Path(path)
    if (directory / "config.json").is_file() and not (directory / "metadata.json").is_file():
        return model_config_from_hf(read_json(directory / "config.json"), source=str(directory))
    try:
        return read_model_metadata(directory).model
    except FileNotFoundError as err:
        raise RecipeError(f"init checkpoint {path}: {err}") from None


def default_tokenizer(recipe: Recipe) -> TokenizerConfig:
    """The recipe's tokenizer, else the one stored with the first init checkpoint."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    for name, path in recipe.init_paths().items():
        if path is None:
            continue
        for candidate in (Path(path) / "tokenizer", Path(path)):
            if (candidate / "tokenizer_config.json").is_file():
                return TokenizerConfig(path=str(candidate))
    raise RecipeError("recipe needs a tokenizer section (tokenizer.path); no init checkpoint "
                      "carries one")
