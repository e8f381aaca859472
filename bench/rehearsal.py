"""A rehearsal at real width (issue [M] item 4): ``wmss run`` through every stage with Qwen3-0.6B's
width, heads and vocabulary, at TP 2, each stage's measured peak per rank against ``wmss plan``.

The model is Qwen3-0.6B's architecture cut to ``--layers`` layers (hidden 1024, 16 query heads
and 8 KV groups of 128, SwiGLU 3072, q/k norms, tied embeddings, 151,936-token vocabulary), in
bf16 and random, saved as an HF directory with a byte-level BPE tokenizer built like Qwen's
(tests/bpe_fixture.py; its few hundred ids live in the full vocabulary). ``wmss run`` runs on two
local ranks with every layout at TP 2: phase 1 SFT, both entropy passes, the selection, joint
training with the chunked loss, extraction, the SFT baseline, and the evaluations (greedy
decoding of a few tokens on a local task with the megatron backend), a few steps each.

Measured: each stage marker's peak per rank (``platform/peak_memory.py``: growth of the rank's
peak RSS over its RSS at the stage's start, with glibc returning every block >= 64 KiB on free,
``MALLOC_MMAP_THRESHOLD_``). Predicted: ``wmss plan CONFIG --target cpu --world-size 2
--eval-prompt-tokens 128`` for the same config: its sft, entropy, joint and eval columns
(training stages at TP 2 x DP 1; the base, imported once at TP 2, loads like every checkpoint,
one stored chunk at a time). Selection and extraction have no column (host-side work); their
peaks are printed for the record.

    python bench/rehearsal.py [--layers 2] [--rows 4] [--seq 512] [--workdir DIR] [--json]

Exits 1 when a planned stage is off by more than ``TOLERANCE``. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a fresh clone without installing

TOLERANCE = 0.15  # issue [M] item 4: within 15% of wmss plan
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                  max_position_embeddings=40960, attention_bias=False)
#: Prompt tokens the plan sizes evaluation for: the local task's questions with the chat template
#: and its instruction take fewer (its prefill is small beside the weights either way).
EVAL_PROMPT_TOKENS = 128
#: Stage kinds of the run -> wmss plan's memory column.
COLUMNS = {"sft": "sft", "entropy": "entropy", "joint": "joint", "eval": "eval"}
_WORDS = ("the sum of two numbers is found by adding them one digit at a time from the right "
          "and carrying what is left over to the next column").split()


def build_base(hf_dir: Path, directory: Path, layers: int) -> None:
    """Qwen3-0.6B's architecture with ``layers`` layers, random bf16 weights, and the BPE, as
    an HF directory, imported at TP 2 (``wmss import-hf``: a base read by five stages is
    converted once, as ``wmss plan`` advises)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.bpe_fixture import build_tokenizer

    tok_dir = build_tokenizer(hf_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = Qwen3Config(num_hidden_layers=layers, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **QWEN3_0_6B)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(hf_dir)
    done = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "import-hf", "--hf-dir",
                           str(hf_dir), "--out", str(directory), "--tp", "2", "--overwrite"],
                          capture_output=True, text=True, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"wmss import-hf failed: {done.stderr[-3000:]}")


def _text(rng, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def write_data(root: Path, rows: int, seq: int) -> tuple[Path, Path]:
    """``rows`` conversations long enough to fill ``seq`` tokens, and a 2-problem local task."""
    import random

    rng = random.Random(0)
    data = root / "train.jsonl"
    with data.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"idx": i, "messages": [
                {"role": "user", "content": _text(rng, seq // 8)},
                {"role": "assistant", "content": _text(rng, seq)}]}) + "\n")
    evals = root / "eval"
    evals.mkdir(exist_ok=True)
    (evals / "local_math.jsonl").write_text("".join(
        json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
        for a, b in ((2, 3), (10, 7))))
    return data, evals


def write_config(root: Path, data: Path, evals: Path, seq: int, rows: int) -> Path:
    import yaml

    config = {
        "run_dir": str(root / "run"), "base": str(root / "base"), "seeds": [1],
        "training": {
            "data": {"paths": [str(data)], "max_length": seq, "micro_batch_size": 1},
            "parallel": {"tensor_model_parallel_size": 2},
            "memory": {"cross_entropy_impl": "chunked", "recompute": "none",
                       "distributed_optimizer": False},
            "optim": {"lr": 1.0e-5, "warmup_fraction": 0.0, "lr_schedule": "constant"},
            "trainer": {"global_batch_size": 2, "save_interval": 10_000, "keep_last": 1,
                        "log_interval": 1, "tensorboard": False, "progress_bar": False}},
        "entropy": {"micro_batch_size": 2, "tensor_model_parallel_size": 2},
        "selection": {"dedupe": False},
        "eval": {"tasks": ["local_math"], "data_dir": str(evals), "max_new_tokens": 4,
                 "generate_batch_size": 2, "tensor_model_parallel_size": 2,
                 "backend": "megatron"}}
    path = root / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(config: Path, log: Path) -> float:
    """``wmss run CONFIG --nproc-per-node 2``; its wall-clock seconds."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", "run", str(config),
                               "--nproc-per-node", "2"], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=str(REPO))
    if done.returncode != 0:
        raise SystemExit(f"wmss run failed (exit {done.returncode}); its log: {log}\n"
                         + log.read_text()[-4000:])
    return time.monotonic() - start


def compare(config: Path, rows: int) -> dict:
    """Each stage's measured peak (largest over the ranks) against the plan's column."""
    from megatron_wmss.pipeline.config import load_pipeline
    from megatron_wmss.pipeline.stages import plan_stages, read_marker
    from megatron_wmss.plan import PlanOptions
    from megatron_wmss.plan.pipeline import make_plan
    from megatron_wmss.plan.report import plan_to_dict

    plan = make_plan(str(config), options=PlanOptions(world_size=2, target="cpu",
                                                      samples=rows,
                                                      eval_prompt_tokens=EVAL_PROMPT_TOKENS))
    planned = {s.name.split(" ")[0]: s.peak for s in plan.stages}
    pipeline = load_pipeline(str(config))
    stages = []
    for stage in plan_stages(pipeline):
        marker = read_marker(pipeline, stage)
        cost = marker["cost"]
        measured = max(cost["peak_bytes"])
        column = COLUMNS.get(stage.kind)
        predicted = planned.get(column) if column else None
        stages.append({"stage": stage.id, "kind": stage.kind, "seconds": cost["seconds"],
                       "tokens": cost.get("tokens"), "measured_bytes": measured,
                       "measured_per_rank": cost["peak_bytes"], "predicted_bytes": predicted,
                       "error": predicted / measured - 1 if predicted else None})
    return {"stages": stages, "plan": plan_to_dict(plan)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--rows", type=int, default=4, help="training conversations")
    parser.add_argument("--seq", type=int, default=512, help="data.max_length (tokens per row)")
    parser.add_argument("--workdir", default=None, help="where to build and run (default: a "
                        "temporary directory, removed after)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wmss-rehearsal-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        if not (root / "base" / "metadata.json").is_file():
            build_base(root / "hf", root / "base", args.layers)
        data, evals = write_data(root, args.rows, args.seq)
        config = write_config(root, data, evals, args.seq, args.rows)
        seconds = run(config, root / "run.log")
        out = compare(config, args.rows)
        out.update(seconds=seconds, total_seconds=time.monotonic() - start,
                   layers=args.layers, rows=args.rows, seq=args.seq, tolerance=TOLERANCE,
                   model=QWEN3_0_6B)
    print(f"{'stage':<24} {'kind':<8} {'seconds':>8} {'predicted':>10} {'measured':>10} "
          f"{'error':>7}", file=sys.stderr)
    bad = []
    for s in out["stages"]:
        pred = "—" if s["predicted_bytes"] is None else f"{s['predicted_bytes'] / 2**30:.3f}"
        err = "—" if s["error"] is None else f"{s['error']:+.1%}"
        print(f"{s['stage']:<24} {s['kind']:<8} {s['seconds']:>8.1f} {pred:>10} "
              f"{s['measured_bytes'] / 2**30:>10.3f} {err:>7}", file=sys.stderr)
        if s["error"] is not None and abs(s["error"]) > TOLERANCE:
            bad.append(s["stage"])
    print(f"GiB per rank (largest over the 2 ranks); wmss run took {out['seconds']:.0f} s",
          file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    if bad:
        print(f"off by more than {TOLERANCE:.0%}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
