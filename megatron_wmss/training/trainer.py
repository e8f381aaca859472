"""The training loop of ``wmss sft`` (phase 1) and ``wmss joint`` (phase 3), run on every rank.

    recipe = load_recipe("joint", "examples/recipes/tiny-joint.yaml", ["optim.lr=1e-4"])
    exit_code = run_training(recipe)          # inside an initialized process group

Order of work: tokenizer and data (rank 0 tokenizes first, the others read its cache), the
model description, then model(s) and optimizer. If RUN_DIR/checkpoints holds a complete
checkpoint the run resumes from it (model, optimizer, scheduler, step, λ position, consumed
samples, RNG); otherwise weights come from ``init`` (megatron checkpoints, or HF directories
imported on the fly into RUN_DIR/init/). Each step: forward/backward, a guarded optimizer step
(non-finite loss or gradient norm: skipped and counted; ``trainer.max_nonfinite_steps`` in a
row: a ``-nonfinite`` checkpoint and :class:`NonFiniteTrainingError`), metrics, periodic
checkpoints, and a collective check for SIGTERM/SIGUSR1 or the wall-clock limit, after which
the run saves and returns :data:`PREEMPTION_EXIT_CODE`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_wmss.platform.ranks import on_rank_zero, rank_zero_first
from megatron_wmss.training.observe import (
    MetricsLogger,
    ProgressBar,
    model_flops_per_token,
    peak_flops_per_device,
)
from megatron_wmss.training.recipe import Recipe, RecipeError, default_tokenizer, resolve_model
from megatron_wmss.training.signals import PREEMPTION_EXIT_CODE, PreemptionGuard
from megatron_wmss.training.state import (
    TrainState,
    checkpoint_name,
    find_intact_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)

__all__ = ["NonFiniteTrainingError", "PREEMPTION_EXIT_CODE", "run_training"]


class NonFiniteTrainingError(RuntimeError):
    """The loss or gradient norm stayed non-finite for ``trainer.max_nonfinite_steps`` steps."""


def _rank0() -> bool:
    return dist.get_rank() == 0


def _write_resolved_config(recipe: Recipe) -> None:
    """RUN_DIR/config.yaml: the recipe as this run resolved it (rank 0, atomic)."""
    import yaml

    from megatron_wmss.platform.files import write_file_atomic

    write_file_atomic(recipe.run_dir / "config.yaml",
                      yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _tokenize(recipe: Recipe):
    from megatron_wmss.data import load_tokenizer, tokenize_sft

    tokenizer = load_tokenizer(default_tokenizer(recipe))
    data_cfg = recipe.data
    if data_cfg.cache_dir is None:
        data_cfg = dataclasses.replace(data_cfg, cache_dir=str(recipe.run_dir / "data-cache"))
    # Rank 0 tokenizes and fills the cache; the others then read it instead of racing. A
    # failure on any rank reaches every rank, which would otherwise wait for it forever.
    data = rank_zero_first(lambda: tokenize_sft(data_cfg, tokenizer), "tokenization")
    return tokenizer, data, data_cfg


def _import_hf_inits(recipe: Recipe) -> dict[str, Optional[str]]:
    """Init paths with every HF directory replaced by a megatron checkpoint imported (once, at
    this layout) into RUN_DIR/init/<name>."""
    from megatron_wmss.interop import import_hf

    out = {}
    for name, path in recipe.init_paths().items():
        if path is not None and (Path(path) / "config.json").is_file() and \
                not (Path(path) / "metadata.json").is_file():
            target = recipe.run_dir / "init" / name
            if not (target / "metadata.json").is_file():
                import_hf(path, target, overwrite=True)
            path = str(target)
        out[name] = path
    return out


def _matching_vocab(cfg, inits: dict) -> object:
    """``cfg`` padded to the rows of the checkpoints it starts from (they depend on the TP
    size they were written at); they must all have the same number of rows."""
    from megatron_wmss.interop.convert import (
        checkpoint_padded_vocab,
        checkpoint_prefix,
        model_for_checkpoint,
    )

    rows = {name: checkpoint_padded_vocab(path, checkpoint_prefix(path))
            for name, path in inits.items() if path is not None}
    if len(set(rows.values())) > 1:
        raise RecipeError(f"init checkpoints have different padded vocabularies {rows}: import "
                          "or convert them at one tensor-parallel size")
    if rows:
        (name, count), = list(rows.items())[:1]
        tp = ps.get_tensor_model_parallel_world_size()
        if count != cfg.padded_vocab_size(tp):
            cfg = model_for_checkpoint(cfg, count, inits[name])
    return cfg


def _load_init_weights(setup, recipe: Recipe, inits: dict) -> None:
    """Each model from its init checkpoint (single-model or one half of a joint one, any
    layout); models without one keep their seeded random weights."""
    from megatron_wmss.interop.convert import checkpoint_prefix
    from megatron_wmss.models.checkpoint import load_model_checkpoint

    if recipe.joint:
        joint = setup.unwrapped
        pairs = ((joint.strong, inits["strong"]), (joint.weak, inits["weak"]))
    else:
        pairs = ((setup.unwrapped, inits["model"]),)
    for module, path in pairs:
        if path is not None:
            load_model_checkpoint(module, path, checkpoint_prefix(path))
    setup.weights_changed()  # bf16 runs: the optimizer's fp32 copies follow the loaded weights


def _metadata_writer(cfg, inits: dict, staging: Path):
    """What each checkpoint carries beside its weights: the init checkpoint's description
    (HF config and tokenizer included), else one of our own. The description is copied to
    ``staging`` at the first save: a resumed run's source is its resume checkpoint, which
    ``keep_last`` deletes once newer ones exist."""
    from megatron_wmss.interop.metadata import MODEL_FILE, copy_model_metadata, \
        write_model_metadata

    source = next((p for p in inits.values() if p is not None and (Path(p) / MODEL_FILE).is_file()),
                  None)
    staged = []

    def write(directory: Path) -> None:
        if source is None:
            write_model_metadata(directory, cfg)
            return
        if not staged:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            copy_model_metadata(source, staging)
            staged.append(staging)
        copy_model_metadata(staging, directory)

    return write


def _step_record(metrics, state: TrainState, seconds: float, flops_per_token: float,
                 peak: Optional[float]) -> dict:
    tokens_per_s = metrics.tokens / seconds if seconds > 0 else 0.0
    record = {"step": state.step, "loss": metrics.loss, "lr": metrics.lr,
              "grad_norm": metrics.grad_norm, "tokens_per_s": tokens_per_s,
              "supervised_tokens": metrics.num_tokens, "tokens": metrics.tokens,
              "consumed_samples": state.consumed_samples,
              "skipped": metrics.skipped, "skipped_steps": state.skipped_steps,
              "step_time_s": seconds}
    for name, value in metrics.grad_norms.items():
        record[f"grad_norm/{name}"] = value
    if metrics.mix_lambda is not None:
        record["mix_lambda"] = metrics.mix_lambda
    record.update(metrics.diagnostics)
    record.update(metrics.update_norms)
    if peak is not None:
        record["mfu"] = flops_per_token * tokens_per_s / (peak * dist.get_world_size())
    return record


def run_training(recipe: Recipe) -> int:
    """Train to the end (0) or until preempted (:data:`PREEMPTION_EXIT_CODE`), on every rank of
    an initialized process group with megatron's parallel state set up. SIGTERM/SIGUSR1 are
    caught from the start (a signal during set-up stops the run at its first step check)."""
    with PreemptionGuard(recipe.trainer.exit_duration_minutes) as guard:
        return _train(recipe, guard)


PREEMPTED_FILE = "preempted.json"


def _sweep_leftovers(checkpoints: Path) -> None:
    """Temporary directories of saves that a kill interrupted (never a complete checkpoint)."""
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            if path.is_dir() and (path.name.startswith(".") or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)


def _train(recipe: Recipe, guard: PreemptionGuard) -> int:
    from megatron_wmss.data import build_sft_loader
    from megatron_wmss.training.setup import setup_training
    from megatron_wmss.training.state import read_train_state
    from megatron_wmss.training.step import train_step

    run_dir = recipe.run_dir
    checkpoints = run_dir / "checkpoints"
    def prepare_run_dir() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        _sweep_leftovers(checkpoints)

    on_rank_zero(prepare_run_dir, "run directory", share=False)
    tokenizer, data, data_cfg = _tokenize(recipe)
    resolve_model(recipe, tokenizer.vocab_size)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_micro = recipe.num_microbatches(dp)
    from megatron_wmss.data.collate import epoch_items
    from megatron_wmss.training.resume_key import check_resume_key, resume_key

    items = epoch_items(data, data_cfg)  # samples, or packed rows
    total = recipe.total_steps(items)
    # Checked against its manifest; a damaged one gives way to the one before it (logged).
    resume = find_intact_checkpoint(
        checkpoints, log=lambda line: print(f"wmss {recipe.command}: {line}", flush=True))
    key = resume_key(recipe, tokenizer, data, data_cfg, items_per_epoch=items,
                     total_steps=total)
    if resume is not None:
        unchecked = check_resume_key(read_train_state(resume).get("recipe"), key, resume)
        if unchecked and _rank0():
            print(f"wmss {recipe.command}: warning: resume: checkpoint {resume.name} was "
                  f"written before {', '.join(unchecked)} were checked on resume; resuming on "
                  "the assumption that they did not change", file=sys.stderr, flush=True)
    # After the check: a refused rerun leaves the run's config as it was.
    on_rank_zero(lambda: _write_resolved_config(recipe), "config.yaml", share=False)
    inits = _import_hf_inits(recipe) if resume is None else recipe.init_paths()
    cfg = _matching_vocab(recipe.model, {"resume": str(resume)} if resume else inits)
    setup = setup_training(cfg, recipe.parallel, recipe.optim, total, mix=recipe.mix,
                           seed=recipe.trainer.seed, memory=recipe.memory,
                           sft_loss=None if recipe.joint else recipe.loss)
    if resume is not None:
        state = load_training_checkpoint(setup, resume)
        if state.data_seed != data_cfg.seed:
            raise RecipeError(f"data.seed={data_cfg.seed} differs from the seed {state.data_seed} "
                              f"the run in {run_dir} was started with (samples would repeat); "
                              "use a new trainer.run_dir to start over")
        if _rank0():
            print(f"wmss {recipe.command}: resuming from {resume} (step {state.step} of "
                  f"{total})", flush=True)
    else:
        _load_init_weights(setup, recipe, inits)
        state = TrainState(data_seed=data_cfg.seed, total_steps=total)
    metadata_writer = _metadata_writer(cfg, {"resume": str(resume)} if resume else inits,
                                       run_dir / ".model_metadata")

    loader = build_sft_loader(data, data_cfg, pad_id=tokenizer.pad_id, dp_rank=dp_rank,
                              dp_size=dp, consumed_samples=state.consumed_samples,
                              num_epochs=recipe.trainer.epochs,
                              epoch_multiple=recipe.trainer.global_batch_size)
    batches = iter(loader)
    trainer = recipe.trainer
    flops = model_flops_per_token(cfg, data_cfg.max_length)
    if recipe.joint:
        trained_weak = not recipe.mix.freeze_weak
        flops += model_flops_per_token(cfg, data_cfg.max_length, backward=trained_weak)
    peak = peak_flops_per_device()
    logger = MetricsLogger(run_dir, enabled=_rank0(), resume_step=state.step,
                           tensorboard=trainer.tensorboard, wandb_project=trainer.wandb_project,
                           config=recipe.to_dict())
    bar = ProgressBar(total, state.step, enabled=_rank0() and trainer.progress_bar,
                      desc=f"wmss {recipe.command}")

    def save(nonfinite: bool = False) -> Path:
        _sync_params_for_save(setup)
        return save_training_checkpoint(setup, state, checkpoints, keep_last=trainer.keep_last,
                                        metadata_writer=metadata_writer, nonfinite=nonfinite,
                                        recipe_key=key)

    saved_at = state.step if resume is not None else -1
    try:
        while state.step < total:
            log_now = (state.step + 1) % trainer.log_interval == 0 or state.step + 1 == total
            start = time.perf_counter()
            metrics = train_step(setup, batches, num_microbatches=n_micro,
                                 micro_batch_size=data_cfg.micro_batch_size,
                                 seq_length=data_cfg.padded_length,
                                 diagnostics=log_now,
                                 update_norm=log_now and trainer.log_update_norm)
            seconds = time.perf_counter() - start
            state.step = setup.step
            state.consumed_samples += trainer.global_batch_size
            state.skipped_steps += int(metrics.skipped)
            state.nonfinite_in_row = state.nonfinite_in_row + 1 if metrics.skipped else 0
            record = _step_record(metrics, state, seconds, flops, peak)
            if log_now or metrics.skipped:
                logger.log(record)
            bar.update(record)
            if state.nonfinite_in_row >= trainer.max_nonfinite_steps:
                where = save(nonfinite=True)
                raise NonFiniteTrainingError(_nonfinite_message(metrics, state, where,
                                                                recipe))
            # No periodic checkpoint inside a non-finite streak: its state is suspect.
            if trainer.save_interval and state.step % trainer.save_interval == 0 \
                    and not state.nonfinite_in_row:
                save()
                saved_at = state.step
            reason = guard.should_exit()
            if reason is not None:
                if saved_at != state.step:
                    save()
                def say_preempted() -> None:
                    # For launchers that hide the exit code (torchrun): the run says it.
                    (run_dir / PREEMPTED_FILE).write_text(json.dumps(
                        {"step": state.step, "reason": reason,
                         "exit_code": PREEMPTION_EXIT_CODE}) + "\n")
                    print(f"wmss {recipe.command}: {reason} at step {state.step}: saved; "
                          f"exiting with {PREEMPTION_EXIT_CODE} (rerun the same command to "
                          "resume)", flush=True)

                # Shared: were it to fail, no rank may exit 75 (a requeue) instead of failing.
                on_rank_zero(say_preempted, "preemption", share=False)
                return PREEMPTION_EXIT_CODE
        final = save() if saved_at != state.step else checkpoints / checkpoint_name(state.step)
        if _rank0():
            print(f"wmss {recipe.command}: done after {state.step} steps "
                  f"({state.skipped_steps} skipped); checkpoint {final}", flush=True)
        return 0
    finally:
        bar.close()
        logger.close()


def _sync_params_for_save(setup) -> None:
    """With an overlapped parameter all-gather the model's weights trail the optimizer's until
    the next forward; finish the gather so the checkpoint holds the updated weights."""
    memory = setup.memory
    if memory is not None and memory.distributed_optimizer and memory.overlap_param_gather:
        for chunk in setup.model:
            chunk.start_param_sync(force_sync=True)


def _nonfinite_message(metrics, state: TrainState, where: Path, recipe: Recipe) -> str:
    import math

    bad = [name for name, value in metrics.grad_norms.items() if not math.isfinite(value)]
    parts = []
    if not math.isfinite(metrics.loss):
        parts.append(f"loss {metrics.loss}")
    if bad == ["model"]:
        parts.append("the model's gradient norm")
    elif bad:
        parts.append(f"the gradient norm of the {' and the '.join(bad)} model")
    what = " and ".join(parts) or f"gradient norm {metrics.grad_norm}"
    return (f"step {state.step}: {what} not finite for "
            f"{recipe.trainer.max_nonfinite_steps} steps in a row; stopped and saved "
            f"{where} (not marked latest: the last good checkpoint stays the one a rerun "
            "resumes from)")
