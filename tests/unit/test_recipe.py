"""Recipes: YAML + key=value overrides onto the config dataclasses, checked before training."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_wmss.config import ModelConfig
from megatron_wmss.config.recipe import RecipeError, apply_overrides
from megatron_wmss.training.recipe import load_recipe
from megatron_wmss.training.setup import warmup_steps

REPO = Path(__file__).resolve().parents[2]
TINY_SFT = REPO / "examples" / "recipes" / "tiny-sft.yaml"
TINY_JOINT = REPO / "examples" / "recipes" / "tiny-joint.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the example recipes name files relative to the repository


def test_example_recipes_load_and_overrides_are_typed():
    # 1e-4 without a dot is a string to YAML 1.1; a float field takes it as the number.
    recipe = load_recipe("sft", str(TINY_SFT), ["optim.lr=1e-4", "trainer.save_interval=7"])
    assert recipe.optim.lr == 1e-4 and recipe.trainer.save_interval == 7
    assert recipe.model is None and recipe.model_overrides["num_layers"] == 2
    joint = load_recipe("joint", str(TINY_JOINT), ["mix.mix_lambda=0.42"], run_dir="elsewhere")
    assert joint.mix.mix_lambda == 0.42 and str(joint.run_dir) == "elsewhere"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-4", r"unknown key optim\.lrr; did you mean optim\.lr\?"),
    ("trainr.epochs=2", r"unknown key trainr; did you mean trainer\?"),
    ("optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
    ("trainer.epochs=1.5", r"trainer\.epochs must be an int, got 1\.5"),
    ("data.shuffle=yes please", r"data\.shuffle must be true \| false"),
    ("optim.warmup_fraction=1.5", r"optim: OptimConfig\.warmup_fraction must be in \[0, 1\)"),
    ("data.paths=[missing.jsonl]", r"data\.paths: .*missing\.jsonl"),
    ("init.model=no/such/ckpt", r"init\.model: checkpoint no/such/ckpt does not exist"),
    ("tokenizer.path=no.model", r"tokenizer\.path: no\.model does not exist"),
    ("trainer.global_batch_size=0", r"trainer\.global_batch_size must be an int >= 1"),
    ("optim=3", r"optim must be a mapping of OptimConfig fields"),
    ("mix.mix_lambda=0.5", r"mix applies to joint runs only"),
    ("parallel.pipeline_model_parallel_size=2", r"needs data\.pad_to_max_length=true"),
])
def test_bad_recipes_are_errors_naming_the_field(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("sft", str(TINY_SFT), [override])


def test_sequence_parallel_runs_the_chunked_loss_and_needs_rows_that_split():
    sp = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    for impl in ("chunked", "null"):
        recipe = load_recipe("joint", str(TINY_JOINT), sp + [f"memory.cross_entropy_impl={impl}"])
        assert recipe.parallel.sequence_parallel
        assert recipe.memory.resolved(cuda=False).cross_entropy_impl == "chunked"
    with pytest.raises(RecipeError, match=r"data\.pad_to_multiple_of=3 must be a multiple of "
                                          r"parallel\.tensor_model_parallel_size=2"):
        load_recipe("joint", str(TINY_JOINT), sp + ["data.pad_to_multiple_of=3"])


def test_override_syntax_is_checked():
    with pytest.raises(RecipeError, match="must look like section.field=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(RecipeError, match="optim.lr is a value, not a section"):
        apply_overrides({"optim": {"lr": 1}}, ["optim.lr.x=2"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d.e=null"]) == \
        {"a": {"b": 1, "c": [1, 2]}, "d": {"e": None}}


def _checkpoint_description(directory: Path, **fields) -> str:
    from megatron_wmss.interop.metadata import write_model_metadata

    directory.mkdir()
    (directory / "metadata.json").write_text("{}")
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                vocab_size=320)
    write_model_metadata(directory, ModelConfig(**{**base, **fields}))
    return str(directory)


def test_strong_weak_architecture_mismatch_is_found_before_training(tmp_path):
    from megatron_wmss.training.recipe import check_init_architectures

    strong = _checkpoint_description(tmp_path / "strong", num_layers=2)
    weak = _checkpoint_description(tmp_path / "weak", num_layers=4)
    recipe = load_recipe("joint", str(TINY_JOINT), [f"init.strong={strong}", f"init.weak={weak}"])
    with pytest.raises(RecipeError, match="init.strong and init.weak: strong and weak models "
                                          "differ in num_layers: strong=2, weak=4"):
        check_init_architectures(recipe)


@pytest.mark.parametrize("fraction, total, want", [(0.1, 5, 1), (0.1, 100, 10), (0.0, 5, 0),
                                                   (0.25, 6, 2)])
def test_warmup_never_rounds_a_nonzero_fraction_to_zero(fraction, total, want):
    assert warmup_steps(fraction, total) == want


@pytest.mark.parametrize("fraction, total", [(0.0, 7), (0.1, 25), (0.3, 9), (0.0, 1)])
def test_linear_schedule_is_transformers_linear_schedule_step_for_step(fraction, total):
    """optim.lr_schedule = linear (the authors' scripts: HF Trainer's default) against
    transformers' get_linear_schedule_with_warmup with the Trainer's warm-up rounding
    (ceil(ratio x steps)): the learning rate of every optimizer step of a run."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from megatron_wmss.config import OptimConfig
    from megatron_wmss.training.setup import build_scheduler

    optim = OptimConfig(lr=1e-5, lr_schedule="linear", warmup_fraction=fraction)
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    scheduler = build_scheduler(ours, optim, total)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    reference = get_linear_schedule_with_warmup(
        theirs, num_warmup_steps=math.ceil(fraction * total), num_training_steps=total)
    for step in range(total):
        assert ours.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0],
                                                           rel=1e-12, abs=1e-18), step
        scheduler.step(increment=1)
        theirs.step()
        reference.step()


def test_a_bad_recipe_fails_in_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_wmss.cli", "sft", "--config", str(TINY_SFT),
         "--run-dir", str(run_dir), "optim.lrr=1"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "wmss sft: error: unknown key optim.lrr; did you mean optim.lr? (valid keys here: "
        "adam_beta1, adam_beta2, adam_eps, clip_grad, lr, lr_schedule, min_lr, warmup_fraction, "
        "weak_lr, weight_decay)"]
    assert not run_dir.exists()


def test_a_global_batch_that_does_not_split_over_the_ranks_fails_before_they_start(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_wmss.cli", "sft", "--config", str(TINY_SFT),
         "--run-dir", str(run_dir), "--nproc-per-node", "2", "trainer.global_batch_size=6"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "wmss sft: error: trainer.global_batch_size=6 must be a multiple of "
        "data.micro_batch_size x data-parallel size = 4 x 2"]
    assert not run_dir.exists()
