"""``wmss plan``'s per-rank memory against the measured peak of the same CPU training run.

Each configuration trains a 45M-parameter GPT (4 layers, hidden 512, SwiGLU 1536, 8 heads /
2 KV groups of 64, vocabulary 32,000, untied, fp32 or bf16) on one micro-batch of 1 x 512 tokens per
step, through the project's own ``setup_training`` and ``train_step``, for three optimizer
steps (Adam's state exists from the first, so steps 2-3 reach the steady peak), in fresh gloo
ranks spawned on this machine. Measured: growth of the rank's peak RSS (VmHWM, reset through
``/proc/self/clear_refs`` after the batches exist and before the model is built) over its RSS
at that moment, with glibc returning every block >= 64 KiB to the system on free
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors cannot hide a later peak; the largest over the
ranks. Predicted: :func:`megatron_wmss.plan.training_memory` for the same model, layout and
memory settings with the CPU's choices (local layer spec, torch's AdamW, megatron's score
buffer never written and so never resident).

    python bench/plan_check.py [--json] [--only NAME,...]

Prints a table (config, predicted, measured, error) on stderr and, with ``--json``, one JSON
object on stdout; exits 1 when a configuration is off by more than ``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a fresh clone without installing
sys.path.insert(0, HERE)
from run import _reset_peak, _status_kib  # noqa: E402  (bench/run.py: VmHWM, clear_refs)

TOLERANCE = 0.15  # issue [M] item 2: |predicted / measured - 1| <= 15%
SEQ, MICRO, STEPS = 512, 1, 3
MODEL = dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
             num_query_groups=2, head_dim=64, vocab_size=32000, max_position_embeddings=SEQ,
             params_dtype="float32")

#: name -> run: sft | joint, TP, DP, distributed optimizer, recompute, loss, update-norm copy,
#: parameter dtype (default fp32).
CONFIGS = {
    "sft-tp1-chunked": dict(command="sft", tp=1, dp=1, distributed_optimizer=False,
                            recompute="none", cross_entropy="chunked", update_norm=False),
    "sft-tp2-full-unfused": dict(command="sft", tp=2, dp=1, distributed_optimizer=False,
                                 recompute="full", cross_entropy="unfused", update_norm=True),
    "sft-dp2-distopt-selective-unfused": dict(
        command="sft", tp=1, dp=2, distributed_optimizer=True, recompute="selective",
        cross_entropy="unfused", update_norm=False),
    "joint-dp2-distopt-chunked": dict(command="joint", tp=1, dp=2, distributed_optimizer=True,
                                      recompute="none", cross_entropy="chunked",
                                      update_norm=False),
    "joint-tp2-full-chunked": dict(command="joint", tp=2, dp=1, distributed_optimizer=False,
                                   recompute="full", cross_entropy="chunked", update_norm=True),
    "sft-bf16-dp2-distopt-chunked": dict(command="sft", tp=1, dp=2, distributed_optimizer=True,
                                         recompute="none", cross_entropy="chunked",
                                         update_norm=True, params_dtype="bfloat16"),
    "joint-bf16-tp2-selective-unfused": dict(
        command="joint", tp=2, dp=1, distributed_optimizer=False, recompute="selective",
        cross_entropy="unfused", update_norm=False, params_dtype="bfloat16"),
}


def _model(run: dict):
    from megatron_wmss.config import ModelConfig

    return ModelConfig(**{**MODEL, "params_dtype": run.get("params_dtype", "float32")})


def _memory(run: dict):
    from megatron_wmss.config import MemoryConfig

    return MemoryConfig(distributed_optimizer=run["distributed_optimizer"],
                        recompute=run["recompute"], cross_entropy_impl=run["cross_entropy"])


def _measure_rank(run: dict) -> dict:
    import gc

    import torch
    import torch.distributed as dist

    from megatron_wmss.config import MixConfig, OptimConfig, ParallelConfig
    from megatron_wmss.training import setup_training, train_step

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, : SEQ // 4] = -100  # a prompt
    batch = {"tokens": tokens, "labels": labels}
    gc.collect()
    dist.barrier()
    _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    setup = setup_training(_model(run), ParallelConfig(tensor_model_parallel_size=run["tp"]),
                           OptimConfig(lr=1e-4, warmup_fraction=0.0, lr_schedule="constant"),
                           100, mix=MixConfig() if run["command"] == "joint" else None,
                           memory=_memory(run))
    for _ in range(STEPS):
        train_step(setup, iter([batch]), num_microbatches=1, micro_batch_size=MICRO,
                   seq_length=SEQ, update_norm=run["update_norm"])
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024,
            "seconds_per_step": (time.perf_counter() - start) / STEPS}


def predict(run: dict) -> int:
    """The planner's bytes for one rank of ``run`` (CPU choices)."""
    from megatron_wmss.plan import Layout, training_memory

    ranks = training_memory(
        _model(run), Layout(run["tp"], 1, run["dp"]), recompute=run["recompute"],
        cross_entropy=run["cross_entropy"],
        distributed_optimizer=run["distributed_optimizer"], micro_batch_size=MICRO,
        seq_length=SEQ, num_microbatches=1, models=2 if run["command"] == "joint" else 1,
        impl="local", gpu=False, update_norm=run["update_norm"])
    return max(r.total for r in ranks)


def measure(run: dict) -> dict:
    """Run ``run`` in fresh ranks; the largest peak over them and the time per step."""
    from megatron_wmss.testing import run_distributed

    # glibc: every block >= 64 KiB is its own mapping, unmapped on free (inherited by ranks).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = run_distributed(_measure_rank, world_size=run["tp"] * run["dp"], tp=run["tp"],
                              args=(run,), timeout=1200)
    return {"peak_bytes": max(r["peak_bytes"] for r in results),
            "seconds_per_step": max(r["seconds_per_step"] for r in results)}


def check(name: str) -> dict:
    """Predicted and measured bytes of configuration ``name`` and the relative error."""
    run = CONFIGS[name]
    predicted = predict(run)
    measured = measure(run)
    return {"config": name, **run, "predicted_bytes": predicted,
            "measured_bytes": measured["peak_bytes"],
            "error": predicted / measured["peak_bytes"] - 1,
            "seconds_per_step": measured["seconds_per_step"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--only", default=",".join(CONFIGS),
                        help=f"comma-separated configurations (default all: {', '.join(CONFIGS)})")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--only: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    rows = []
    for name in names:
        row = check(name)
        rows.append(row)
        print(f"{name:36s} predicted {row['predicted_bytes'] / 2**20:8.1f} MiB  measured "
              f"{row['measured_bytes'] / 2**20:8.1f} MiB  error {row['error']:+6.1%}  "
              f"({row['seconds_per_step']:.1f} s/step)", file=sys.stderr, flush=True)
    worst = max(abs(r["error"]) for r in rows)
    if args.json:
        print(json.dumps({"model": MODEL, "seq_length": SEQ, "micro_batch_size": MICRO,
                          "steps": STEPS, "tolerance": TOLERANCE, "worst_error": worst,
                          "runs": rows}, indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
