"""``wmss run`` configs and stage plans: the shipped configs load, the plan wires each stage to
the models WMSS.md §5 names, and bad configs fail in one line naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_wmss.config.recipe import RecipeError
from megatron_wmss.pipeline import CONTROLS, load_pipeline
from megatron_wmss.pipeline.stages import plan_stages

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def base(tmp_path) -> str:
    (tmp_path / "base").mkdir()
    return str(tmp_path / "base")


@pytest.mark.parametrize("name", ["examples/demo/demo.yaml",
                                  "examples/recipes/paper-qwen3-4b.yaml",
                                  "examples/recipes/authors-qwen3-8b.yaml"])
def test_shipped_configs_load(name, base):
    config = load_pipeline(str(REPO / name), [f"base={base}"])
    assert config.iterations == 1 and config.seeds
    assert plan_stages(config)[0].id == "shared/entropy_m0"


def test_the_authors_recipe_passes_print_config_with_their_choices(base):
    """examples/recipes/authors-qwen3-8b.yaml through `wmss run --print-config` (the Slurm
    preflight): every difference from the paper's text is selected (README table)."""
    import subprocess
    import sys

    import yaml

    proc = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "run",
                           "examples/recipes/authors-qwen3-8b.yaml", f"base={base}",
                           "--print-config"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)["config"]
    training = config["training"]
    assert training["data"]["loss_on"] == "all"
    assert training["data"]["max_length"] == 4096
    assert (training["optim"]["lr"], training["optim"]["lr_schedule"],
            training["optim"]["warmup_fraction"]) == (1e-5, "linear", 0.0)
    assert training["trainer"]["global_batch_size"] == 256
    assert config["entropy"]["positions"] == "authors"
    assert config["selection"] == {"formula": "reference", "alpha": 0.1, "beta": 0.8,
                                   "gamma": 0.1, "dedupe": False}
    assert config["seeds"] == [42]


@pytest.mark.parametrize("override, message", [
    ("training.data.loss_on=prompt", "training.data: data.loss_on = 'prompt' is invalid; "
                                     "allowed: completion | all"),
    ("joint.optim.lr_schedule=lin", "joint.optim: OptimConfig.lr_schedule must be one of "
                                    "['cosine', 'linear', 'constant'], got 'lin'"),
    ("entropy.positions=answer", "entropy.positions must be next-token or authors"),
])
def test_a_bad_training_section_fails_before_any_stage(override, message, base):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_pipeline(str(REPO / "examples/recipes/authors-qwen3-8b.yaml"),
                      [f"base={base}", override])


def test_seeds_is_a_seed_count_or_a_list(base):
    demo = str(REPO / "examples/demo/demo.yaml")
    assert load_pipeline(demo, [f"base={base}"]).seeds == [1, 2, 3]  # the demo's default
    config = load_pipeline(demo, [f"base={base}", "seeds=5"])
    assert config.seeds == [1, 2, 3, 4, 5]
    assert {s.seed for s in plan_stages(config) if s.id.endswith("/eval_wmss")} == set(range(1, 6))
    assert load_pipeline(demo, [f"base={base}", "seeds=[7, 3]"]).seeds == [7, 3]


def test_one_round_wires_m0_m1_and_the_baseline_epochs(base):
    config = load_pipeline(str(REPO / "examples/demo/demo.yaml"), [f"base={base}", "seeds=[5]"])
    stages = {s.id: s for s in plan_stages(config)}
    assert stages["seed5/sft"].params == {"init": "base", "epochs": 1}
    assert stages["seed5/select1"].params == {"weak": "shared/entropy_m0",
                                              "strong": "seed5/entropy_m1"}
    assert stages["seed5/joint1"].params == {"strong": "seed5/sft", "weak": "base",
                                             "active_set": "seed5/select1"}
    assert stages["seed5/eval_wmss"].params == {"model": "seed5/extract1"}
    assert stages["seed5/baseline"].params["epochs"] == 2
    # The temperature control: the strong model's logits scaled by λ, from M1, active set.
    assert stages["seed5/temperature"].params == {
        "init": "seed5/sft", "epochs": 1, "active_set": "seed5/select1",
        "loss": {"logit_scale": 0.5}}
    order = list(stages)
    assert order.index("seed5/extract1") < order.index("seed5/eval_wmss")


def test_iterations_make_round_t_train_strong_mt_with_weak_mt_minus_1(base):
    config = load_pipeline(str(REPO / "examples/demo/demo.yaml"),
                           [f"base={base}", "seeds=[1]", "controls=[]"], iterations=3)
    stages = {s.id: s for s in plan_stages(config)}
    assert stages["seed1/joint2"].params == {"strong": "seed1/extract1", "weak": "seed1/sft",
                                             "active_set": "seed1/select2"}
    assert stages["seed1/select3"].params == {"weak": "seed1/entropy_m2",
                                              "strong": "seed1/entropy_m3"}
    assert stages["seed1/eval_wmss"].params == {"model": "seed1/extract3"}
    assert stages["seed1/baseline"].params["epochs"] == 4  # 1 + K, the same total


def test_ablations_add_every_control(base):
    config = load_pipeline(str(REPO / "examples/demo/demo.yaml"), [f"base={base}", "seeds=[1]"],
                           ablations=True)
    evals = {s.label for s in plan_stages(config) if s.kind == "eval"}
    assert evals == {"base", "sft_1epoch", "sft_baseline", "wmss", *CONTROLS}


@pytest.mark.parametrize("override,message", [
    (["seedz=[1]"], "unknown key seedz; did you mean seeds"),
    (["controls=[fancy]"], "controls: unknown"),
    (["iterations=2"], "controls compare with one round"),
    (["seeds=[1, 1]"], "seeds lists a seed twice"),
    (["seeds=0"], "seeds: a seed count must be >= 1, got 0"),
    (["seeds=true"], "seeds must be a seed count >= 1 or a non-empty list"),
    (["selection.seed=3"], "selection.seed is each run's seed"),
    (["eval.tasks=[]"], "eval.tasks must be a non-empty list"),
    (["selection.formula=magic"], "formula"),
    (["selection.alhpa=0.2"], "alhpa"),
    (["base=/nonexistent/m0"], "base: /nonexistent/m0 does not exist"),
])
def test_bad_configs_name_the_key(override, message, base):
    with pytest.raises(RecipeError, match=message):
        load_pipeline(str(REPO / "examples/demo/demo.yaml"), [f"base={base}", *override])
