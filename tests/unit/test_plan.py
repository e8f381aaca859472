"""``wmss plan``: recipes and run configs into per-rank memory and steps, in seconds, no GPU.

References are independent of the planner where they can be: Qwen3's published parameter
totals, step counts from the data's line count and the batch, layouts from the world size.
The formulas themselves are checked against built models in
``tests/distributed/test_plan_exact.py`` and against measured peaks in
``tests/slow/test_plan_measured.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_wmss import cli
from megatron_wmss.config import ModelConfig
from megatron_wmss.plan import Layout, training_memory
from megatron_wmss.plan.cli import parse_size
from megatron_wmss.plan.counts import stage_parameters
from megatron_wmss.plan.inputs import read_architecture

REPO = Path(__file__).resolve().parents[2]
PAPER = str(REPO / "examples/recipes/paper-qwen3-4b.yaml")
AUTHORS = str(REPO / "examples/recipes/authors-qwen3-8b.yaml")
TINY_DATA = REPO / "examples/data/tiny_sft.jsonl"
PAPER_SAMPLES = 111657  # WMSS.md §6: the math subset of AM-DeepSeek-R1-Distilled

# The published Qwen3 shapes (config.json of Qwen/Qwen3-4B-Base and Qwen/Qwen3-8B-Base).
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
          "attention_bias": False, "head_dim": 128, "max_position_embeddings": 32768,
          "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000, "torch_dtype": "bfloat16",
          "vocab_size": 151936}
QWEN3_4B = {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True}
QWEN3_8B = {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288,
            "tie_word_embeddings": False}


def _hf_dir(tmp_path, name: str, config: dict) -> str:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def _plan_json(capsys, *argv) -> dict:
    assert cli.main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_parameter_counts_are_qwen3s_published_totals(tmp_path):
    # HF's safetensors totals: Qwen3-4B-Base 4,022,468,096 (tied), Qwen3-8B-Base 8,190,735,360.
    for name, config, total in (("4b", QWEN3_4B, 4_022_468_096),
                                ("8b", QWEN3_8B, 8_190_735_360)):
        cfg = read_architecture(_hf_dir(tmp_path, name, config))
        assert stage_parameters(cfg, 1, 1, 0).total == total
        # Two pipeline stages hold everything once, plus the tied output copy on the last one.
        halves = [stage_parameters(cfg, 1, 2, s) for s in (0, 1)]
        tied_copy = halves[1].output_layer if cfg.tie_word_embeddings else 0
        assert sum(h.total for h in halves) == total + tied_copy


def test_paper_recipe_on_one_and_four_nodes(tmp_path, capsys):
    model = _hf_dir(tmp_path, "qwen3-4b", QWEN3_4B)
    common = [PAPER, "--model", model, "--samples", str(PAPER_SAMPLES)]
    one = _plan_json(capsys, *common, "--nodes", "1")
    four = _plan_json(capsys, *common, "--nodes", "4")
    assert one["world_size"] == 8 and four["world_size"] == 32
    stages = {s["name"]: s for s in one["stages"]}
    assert list(stages) == ["sft", "entropy", "joint", "eval"]
    assert stages["joint"]["layout"] == {"tp": 2, "pp": 1, "dp": 4, "sequence_parallel": False}
    for stage in one["stages"]:
        for rank in stage["ranks"]:
            c = rank["components"]
            assert c["checkpoint_load"] == 0  # GPU target: the load's copy is host memory
            if stage["kind"] in ("sft", "joint"):
                total = c["weights"] + c["gradient_buffers"] + c["optimizer_state"] + max(
                    c["activations"] + max(c["loss"], c["recomputed_layer"]),
                    c["optimizer_step"], c["gradient_reduce"])
            elif stage["kind"] == "entropy":  # the layers' working set, then the entropy's
                total = c["weights"] + max(c["activations"], c["entropy_chunk"])
            else:
                total = c["weights"] + c["kv_cache"] + c["activations"]
            assert rank["total"] == total, stage["name"]
    joint1, joint4 = stages["joint"]["ranks"][0], {s["name"]: s for s in four["stages"]}[
        "joint"]["ranks"][0]
    # Two 4.02B models split over TP=2: 4.02B parameters and bf16 weights per rank.
    assert joint1["parameters"] == stage_parameters(read_architecture(model), 2, 1, 0).total * 2
    assert joint1["components"]["weights"] == 2 * joint1["parameters"]
    # The distributed optimizer shards fp32 main params + Adam (12 B) over DP: 4x less on 4
    # nodes; nothing else changes.
    assert joint1["components"]["optimizer_state"] == 12 * joint1["parameters"] // 4
    assert joint4["components"]["optimizer_state"] == 12 * joint1["parameters"] // 16
    assert joint4["components"]["weights"] == joint1["components"]["weights"]
    assert stages["joint"]["verdict"] == "fits"
    # Steps: 111,657 / 512 = 218 per epoch; phase 3 on 56% of the samples; baseline 2 epochs.
    steps = {p["name"]: p["steps"] for p in one["phases"]}
    assert steps["sft"] == PAPER_SAMPLES // 512
    assert steps["joint1"] == math.floor(PAPER_SAMPLES * 0.56) // 512
    assert steps["baseline"] == 2 * (PAPER_SAMPLES // 512)
    micro = {p["name"]: p["microbatches_per_step"] for p in four["phases"]}
    assert micro["sft"] == 512 // 16  # micro-batch 1, DP 16


def test_authors_recipe_keeps_duplicates_and_full_recompute(tmp_path, capsys):
    model = _hf_dir(tmp_path, "qwen3-8b", QWEN3_8B)
    plan = _plan_json(capsys, AUTHORS, "--model", model, "--nodes", "1", "--samples",
                      str(PAPER_SAMPLES))
    joint = {s["name"]: s for s in plan["stages"]}["joint"]
    assert joint["layout"]["tp"] == 4 and joint["layout"]["dp"] == 2
    assert joint["settings"]["recompute"] == "full"
    assert joint["ranks"][0]["components"]["recomputed_layer"] > 0
    steps = {p["name"]: p["steps"] for p in plan["phases"]}
    assert steps["joint1"] == steps["sft"] == PAPER_SAMPLES // 256  # no de-duplication


def test_tiny_recipe_counts_its_data_rows(capsys):
    rows = sum(1 for line in TINY_DATA.read_text().splitlines() if line.strip())
    recipe = yaml.safe_load((REPO / "examples/recipes/tiny-sft.yaml").read_text())
    plan = _plan_json(capsys, str(REPO / "examples/recipes/tiny-sft.yaml"), "--target", "cpu")
    (phase,) = plan["phases"]
    assert plan["samples"] == rows
    batch = recipe["trainer"]["global_batch_size"]
    assert phase["steps"] == recipe["trainer"]["epochs"] * (rows // batch)
    assert phase["microbatches_per_step"] == batch // recipe["data"]["micro_batch_size"]
    (stage,) = plan["stages"]
    assert stage["settings"]["layers"] == "local" and not stage["settings"][
        "distributed_optimizer"]  # the CPU's choices


def test_run_config_plans_every_stage(tmp_path, capsys):
    base = _hf_dir(tmp_path, "base", {**QWEN3_4B, "num_hidden_layers": 2, "hidden_size": 64,
                                      "intermediate_size": 128, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "head_dim": 16,
                                      "vocab_size": 320})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "base": base, "controls": ["frozen_weak"],
        "training": {"data": {"paths": [str(TINY_DATA)], "max_length": 96,
                              "micro_batch_size": 4},
                     "trainer": {"global_batch_size": 16}},
        "eval": {"tasks": ["gsm8k"]}}))
    rows = sum(1 for line in TINY_DATA.read_text().splitlines() if line.strip())
    plan = _plan_json(capsys, str(config), "--world-size", "2", "--active-fraction", "0.5")
    assert [s["name"] for s in plan["stages"]] == ["sft", "entropy", "joint",
                                                   "joint (frozen weak)", "eval"]
    phases = {p["name"]: p for p in plan["phases"]}
    assert set(phases) == {"entropy_m0", "sft", "entropy_m1", "joint1", "baseline",
                           "frozen_weak"}
    assert phases["sft"]["steps"] == rows // 16
    assert phases["joint1"]["steps"] == (rows // 2) // 16
    assert phases["baseline"]["steps"] == 2 * (rows // 16)
    assert phases["entropy_m0"]["microbatches_per_step"] == math.ceil(rows / 2 / 8)
    stages = {s["name"]: s["ranks"][0]["components"] for s in plan["stages"]}
    # A frozen weak model has no gradient buffer or optimizer state.
    assert stages["joint (frozen weak)"]["gradient_buffers"] * 2 == stages["joint"][
        "gradient_buffers"]
    assert stages["eval"]["kv_cache"] > 0 and stages["entropy"]["entropy_chunk"] > 0


def _qwen3_4b() -> ModelConfig:
    return ModelConfig(num_layers=36, hidden_size=2560, ffn_hidden_size=9728,
                       num_attention_heads=32, num_query_groups=8, head_dim=128,
                       vocab_size=151936, qk_layernorm=True, tie_word_embeddings=True)


def _memory(layout=Layout(2, 1, 4), **overrides):
    kwargs = dict(recompute="none", cross_entropy="chunked", distributed_optimizer=True,
                  micro_batch_size=1, seq_length=4096, num_microbatches=8, models=2)
    kwargs.update(overrides)
    return training_memory(_qwen3_4b(), layout, **kwargs)


def test_memory_moves_the_way_each_setting_says():
    act = {mode: _memory(recompute=mode)[0].components["activations"]
           for mode in ("none", "selective", "full")}
    assert act["none"] > act["selective"] > act["full"] > 0
    sp = _memory(Layout(2, 1, 4, sequence_parallel=True))[0].components
    assert sp["activations"] < act["none"]
    plain, sharded = (_memory(distributed_optimizer=d)[0].components for d in (False, True))
    assert plain["optimizer_state"] == 4 * sharded["optimizer_state"]
    # The chunked loss holds no [T, V/t] tensor, but an fp32 [V/t, h] weight gradient per
    # model: at 4096 tokens per micro-batch the two are even, at 4 x 4096 chunked is far less.
    loss = {(c, b): _memory(cross_entropy=c, micro_batch_size=b)[0].components["loss"]
            for c in ("chunked", "unfused") for b in (1, 4)}
    assert loss["chunked", 4] < loss["unfused", 4] / 2
    assert loss["unfused", 4] - loss["unfused", 1] > 3 * (loss["chunked", 4] - loss["chunked", 1])
    frozen = _memory(freeze_weak=True)[0].components
    assert 2 * frozen["gradient_buffers"] == sharded["gradient_buffers"]
    # 1F1B: the first of 4 stages holds 4 micro-batches in flight, the last 1.
    stages = _memory(Layout(2, 4, 1))
    per_layer = stages[3].components["activations"]
    assert stages[0].components["activations"] == 4 * per_layer
    assert stages[0].components["loss"] == 0 < stages[3].components["loss"]


@pytest.mark.parametrize("text,size", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9),
                                       ("141 GB", 141 * 10**9), ("80", 80 * 2**30),
                                       ("0.5TiB", 2**39)])
def test_gpu_memory_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("argv,message", [
    ([PAPER], "pass --model"),
    (["examples/recipes/tiny-sft.yaml", "--world-size", "3",
      "parallel.tensor_model_parallel_size=2"], "world size 3 is not a multiple of TP x PP"),
    (["examples/recipes/tiny-sft.yaml", "model.hiden_size=3"], "did you mean model.hidden_size"),
    (["examples/recipes/tiny-sft.yaml", "--gpu-memory", "lots"], "argument --gpu-memory"),
    (["examples/recipes/tiny-sft.yaml", "parallel.pipeline_model_parallel_size=2"],
     "needs data.pad_to_max_length"),
])
def test_bad_input_is_one_line_naming_it(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    try:
        code = cli.main(["plan", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wmss plan: error:") and message in err[0], err


def test_human_table_has_every_component_and_a_verdict(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["plan", "examples/recipes/tiny-joint.yaml", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "gradient buffers", "optimizer state", "activations", "loss",
                "total", "verdict", "optimizer steps", "Korthikanti"):
        assert row in out, row


def test_a_run_config_plan_predicts_the_cost_ratio_the_report_compares_with(tmp_path, capsys):
    from megatron_wmss.pipeline.cost import predicted_cost_ratio

    demo = str(REPO / "examples" / "demo" / "demo.yaml")
    model = _hf_dir(tmp_path, "4b", QWEN3_4B)  # the demo's base is made by `make demo`
    out = _plan_json(capsys, demo, "--target", "cpu", "--samples", "4096",
                     "--active-fraction", "0.375", "--model", model)
    assert out["cost"]["ratio"] == pytest.approx(predicted_cost_ratio(1, [0.375]))
    assert out["cost"]["active_fraction"] == 0.375
    # The paper's unique share (de-duplication is the default) without --active-fraction.
    out = _plan_json(capsys, demo, "--target", "cpu", "--samples", "4096", "--model", model)
    assert out["cost"]["ratio"] == pytest.approx((3 + 2 + 6 * 0.56) / 6)


def test_an_hf_base_is_named_as_imported_by_every_stage_only_when_it_is_the_base(tmp_path,
                                                                               capsys):
    import yaml

    hf = _hf_dir(tmp_path, "base", QWEN3_4B)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "base": hf,
        "training": {"data": {"paths": [str(TINY_DATA)], "max_length": 256}}}))
    notes = _plan_json(capsys, str(config))["notes"]
    assert any("the base is an HF directory" in n and "wmss import-hf" in n for n in notes)
    # --model names an architecture only (the real base may be a megatron checkpoint).
    notes = _plan_json(capsys, str(config), "--model", hf)["notes"]
    assert not any("the base is an HF directory" in n for n in notes)
