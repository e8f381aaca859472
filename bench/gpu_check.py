"""What a joint WMSS step costs on one GPU next to SFT, and what the mixed CE keeps in memory.

    python bench/gpu_check.py [--cpu] [--json-out FILE]     (bench/gpu_check.sh runs it)

On CUDA (one rank, NCCL, megatron's local layer spec, bf16 parameters), for a ~1.1B
Qwen3-shaped model (16 layers, hidden 2048, SwiGLU 6144, 16 heads / 8 KV groups of 128,
vocabulary 151936, tied embeddings; micro-batch 1 x 2048 tokens):
  - seconds per optimizer step of plain SFT, of the joint step with a trained weak model and
    with a frozen one (``MixConfig(freeze_weak=True)``), warm-up steps excluded, and each joint
    step's ratio to SFT;
  - model FLOPs per step and MFU against the H200's dense bf16 peak (``PEAK_TFLOPS``);
  - peak memory of each run, and of ``mixed_cross_entropy`` forward+backward on
    ``[8192, 151936]`` bf16 logits (``torch.cuda.max_memory_allocated`` above the inputs).
Without CUDA (``--cpu``, or no GPU) the same code runs on tiny shapes on CPU and every number
that needs CUDA is null, with the reason under ``null_reasons``. Prints one JSON object.

``--requirements`` prints the pip requirements of the offline install instead (stdlib only;
versions come from setup.py and pyproject.toml, the one place they are declared).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import gc
import itertools
import json
import re
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEAK_TFLOPS = 989.0
PEAK_WHAT = "NVIDIA H200 SXM dense bf16 tensor-core peak, TFLOP/s (1979 with 2:4 sparsity)"
FLOPS_CONVENTION = (
    "per token and model: trained 6*N + 12*L*A*S, frozen (forward only) 2*N + 4*L*A*S, with N "
    "the model's parameters (tied embedding counted once, as the output GEMM), L layers, A = "
    "heads*head_dim, S the sequence length (attention counted as full S x S, PaLM's convention, "
    "though causal kernels may skip half); the mixed loss itself is not counted")

# What the GPU check imports beyond torch (names as in setup.py), and what builds the project.
CHECK_REQUIREMENTS = ("megatron-core", "numpy", "psutil", "pyyaml")
CHECK_DEV_REQUIREMENTS = ("pytest", "pytest-timeout")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One measurement's sizes: the model, the step, and the mixed-CE input."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    seq_length: int
    num_microbatches: int
    ce_tokens: int
    ce_vocab: int


GPU_SHAPES = Shapes(16, 2048, 6144, 16, 8, 128, 151936, 2048, 8, 8192, 151936)
CPU_SHAPES = Shapes(2, 64, 128, 4, 2, 16, 512, 32, 2, 256, 2048)


# ---------------------------------------------------------------------------------------------
# Requirements of the offline install (no third-party imports here: runs before any install).

def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def requirements() -> list[str]:
    """The pip specs the GPU check installs from the wheelhouse, as setup.py pins them, plus
    the project's build backend (pyproject.toml)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    kwargs = {kw.arg: kw.value for kw in call.keywords}
    install = ast.literal_eval(kwargs["install_requires"])
    dev = ast.literal_eval(kwargs["extras_require"])["dev"]
    import tomllib  # Python 3.11+

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    specs = [s for s in install if _name(s) in CHECK_REQUIREMENTS]
    specs += [s for s in dev if _name(s) in CHECK_DEV_REQUIREMENTS]
    missing = set(CHECK_REQUIREMENTS + CHECK_DEV_REQUIREMENTS) - {_name(s) for s in specs}
    if missing:
        raise SystemExit(f"setup.py no longer declares {sorted(missing)}; update "
                         "CHECK_REQUIREMENTS in bench/gpu_check.py")
    return specs + list(build)


def wheel_dependencies(wheel: str, skip: tuple[str, ...] = ("torch",)) -> list[str]:
    """A wheel's unconditional Requires-Dist entries (extras left out), minus ``skip``."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    deps = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [d for d in deps if "extra ==" not in d and _name(d) not in skip]


# ---------------------------------------------------------------------------------------------
# Measurements (run in one spawned rank: NCCL on a GPU, gloo on CPU).

def _model_config(shapes: Shapes):
    from megatron_wmss.config import ModelConfig

    return ModelConfig(
        num_layers=shapes.num_layers, hidden_size=shapes.hidden_size,
        ffn_hidden_size=shapes.ffn_hidden_size, num_attention_heads=shapes.num_attention_heads,
        num_query_groups=shapes.num_query_groups, head_dim=shapes.head_dim,
        vocab_size=shapes.vocab_size, max_position_embeddings=shapes.seq_length,
        rotary_base=1e6, qk_layernorm=True, tie_word_embeddings=True,
        params_dtype="bfloat16", transformer_impl="local")


def _micro_batches(shapes: Shapes):
    import torch

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(shapes.num_microbatches):
        tokens = torch.randint(0, shapes.vocab_size, (1, shapes.seq_length), generator=gen)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = -100
        batches.append({"tokens": tokens, "labels": labels})
    return itertools.cycle(batches)


def _step_flops(shapes: Shapes, params: int, frozen_weak: bool | None) -> float:
    """Model FLOPs of one optimizer step (see FLOPS_CONVENTION); ``None``: SFT."""
    tokens = shapes.seq_length * shapes.num_microbatches
    attn = shapes.num_layers * shapes.num_attention_heads * shapes.head_dim * shapes.seq_length
    trained = tokens * (6 * params + 12 * attn)
    if frozen_weak is None:
        return trained
    return trained + (tokens * (2 * params + 4 * attn) if frozen_weak else trained)


def _time_steps(shapes: Shapes, mode: str, warmup: int, steps: int, on_cuda: bool) -> dict:
    import torch

    from megatron_wmss.config import MixConfig, OptimConfig, ParallelConfig
    from megatron_wmss.training import setup_training, train_step

    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    mix = None if mode == "sft" else MixConfig(freeze_weak=mode == "joint_frozen_weak")
    setup = setup_training(_model_config(shapes), ParallelConfig(), OptimConfig(
        lr=1e-5, warmup_fraction=0.0, lr_schedule="constant"), warmup + steps, mix=mix)
    model = setup.unwrapped
    params = sum(p.numel() for p in (model if mix is None else model.strong).parameters())
    batches = _micro_batches(shapes)
    step = functools.partial(train_step, setup, batches, micro_batch_size=1,
                             num_microbatches=shapes.num_microbatches,
                             seq_length=shapes.seq_length)
    losses = [step().loss for _ in range(warmup)]
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step().loss for _ in range(steps)]  # .loss is a host float: each step syncs
    if on_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = _step_flops(shapes, params, None if mix is None else mix.freeze_weak)
    out = {"step_time_s": seconds, "model_tflop_per_step": flops / 1e12,
           "achieved_tflops": flops / seconds / 1e12,
           "mfu": flops / seconds / (PEAK_TFLOPS * 1e12) if on_cuda else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
           "parameters_per_model": params, "losses": losses}
    out["planned_peak_gib"], out["planned_vs_measured"] = _planned_peak(shapes, setup, mix,
                                                                        on_cuda)
    del setup, model, step
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        out["memory_left_after_gib"] = torch.cuda.memory_allocated() / 2**30
    return out


def _planned_peak(shapes: Shapes, setup, mix, on_cuda: bool):
    """`wmss plan`'s peak for this step (GiB) and its ratio to torch.cuda.max_memory_allocated
    (issue [M]). A failure is recorded in place of the figure, not raised: the check's other
    figures still count."""
    import torch

    try:
        from megatron_wmss.plan import Layout, training_memory

        memory = setup.memory
        planned = training_memory(
            _model_config(shapes), Layout(1, 1, 1), recompute=memory.recompute,
            cross_entropy=memory.cross_entropy_impl,
            distributed_optimizer=memory.distributed_optimizer, micro_batch_size=1,
            seq_length=shapes.seq_length, num_microbatches=shapes.num_microbatches,
            models=1 if mix is None else 2, freeze_weak=bool(mix and mix.freeze_weak),
            impl="local", gpu=on_cuda)[0].total
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        return f"{type(err).__name__}: {err}", None
    measured = torch.cuda.max_memory_allocated() if on_cuda else 0
    return planned / 2**30, planned / measured if measured else None


def _mixed_ce_memory(shapes: Shapes, on_cuda: bool) -> dict:
    """Peak memory and time of mixed-CE forward+backward over bf16 ``[T, V]`` logits."""
    import torch

    from megatron_wmss.loss import mixed_cross_entropy

    device = torch.device("cuda" if on_cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    t, v = shapes.ce_tokens, shapes.ce_vocab
    strong, weak = (torch.randn(t, v, device=device, generator=gen, dtype=torch.bfloat16)
                    .requires_grad_() for _ in range(2))
    target = torch.randint(0, v, (t,), device=device, generator=gen)

    def fwd_bwd(strong, weak, target):
        strong.grad = weak.grad = None
        mixed_cross_entropy(strong, weak, target, mix_lambda=0.5).sum().backward()

    fwd_bwd(strong, weak, target)  # warm-up: kernels, allocator
    strong.grad = weak.grad = None
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if on_cuda else None
    start = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        fwd_bwd(strong, weak, target)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    logits_bytes = t * v * 2
    peak = torch.cuda.max_memory_allocated() - base if on_cuda else None
    out = {"tokens": t, "vocab": v, "logits_dtype": "bfloat16",
           "logits_bytes_each": logits_bytes, "grad_bytes_each": logits_bytes,
           "fp32_tv_bytes": t * v * 4, "target_bytes": target.numel() * target.element_size(),
           "peak_delta_bytes": peak,
           "peak_delta_over_one_logits": peak / logits_bytes if on_cuda else None,
           "fwd_bwd_ms": seconds * 1e3,
           "note": "delta above the live inputs (two logits, target); it includes the two "
                   "bf16 gradients that backward returns"}
    del strong, weak, target
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return out


def measure(shapes: Shapes, warmup: int, steps: int) -> dict:
    """One rank's measurements, in a megatron parallel state of size 1."""
    import torch

    on_cuda = torch.cuda.is_available()
    out = {"device": torch.cuda.get_device_name() if on_cuda else "cpu",
           "mixed_ce": _mixed_ce_memory(shapes, on_cuda)}
    for mode in ("sft", "joint_trained_weak", "joint_frozen_weak"):
        out[mode] = _time_steps(shapes, mode, warmup, steps, on_cuda)
        print(f"gpu_check: {mode}: {out[mode]['step_time_s']:.3f} s/step", file=sys.stderr,
              flush=True)
    for mode in ("joint_trained_weak", "joint_frozen_weak"):
        out[mode]["ratio_to_sft"] = out[mode]["step_time_s"] / out["sft"]["step_time_s"]
    return out


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    import megatron_wmss

    try:
        wmss = md.version("megatron_wmss")
    except md.PackageNotFoundError:
        wmss = "not installed"
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "megatron_core": md.version("megatron-core"),
            "megatron_wmss": wmss, "megatron_wmss_imported_from": megatron_wmss.__file__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (no CUDA needed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--timeout", type=float, default=360.0, help="seconds for the rank")
    parser.add_argument("--json-out", help="also write the JSON object to this file")
    parser.add_argument("--requirements", action="store_true",
                        help="print the offline install's pip requirements and exit")
    parser.add_argument("--wheel-deps", metavar="WHEEL",
                        help="print a wheel's unconditional dependencies but torch, and exit")
    args = parser.parse_args(argv)
    if args.requirements or args.wheel_deps:
        print("\n".join(requirements() if args.requirements else
                        wheel_dependencies(args.wheel_deps)))
        return 0

    import torch

    from megatron_wmss.platform.spawn import run_distributed

    on_cuda = torch.cuda.is_available() and not args.cpu
    shapes = GPU_SHAPES if on_cuda else CPU_SHAPES
    # device="auto": NCCL on the GPU; "cpu" hides it (gloo, CPU shims).
    result = run_distributed(measure, 1, args=(shapes, args.warmup, args.steps),
                             timeout=args.timeout, device="auto" if on_cuda else "cpu")[0]
    reasons = {}
    if not on_cuda:
        why = ("no CUDA device" if not torch.cuda.is_available() else "--cpu given") + \
              ": tiny CPU shapes; "
        for mode in ("sft", "joint_trained_weak", "joint_frozen_weak"):
            reasons[f"{mode}.mfu"] = why + "the peak is that of an H200, not of this CPU"
            reasons[f"{mode}.peak_memory_gib"] = why + "torch.cuda.max_memory_allocated"
        for key in ("peak_delta_bytes", "peak_delta_over_one_logits"):
            reasons[f"mixed_ce.{key}"] = why + "torch.cuda.max_memory_allocated"
    report = {"check": "wmss-gpu-check", "shapes": "gpu" if on_cuda else "cpu-tiny",
              **_versions(), "device": result.pop("device"),
              "model": {**dataclasses.asdict(shapes), "params_dtype": "bfloat16",
                        "layer_spec": "local", "tie_word_embeddings": True,
                        "micro_batch_size": 1,
                        "tokens_per_step": shapes.seq_length * shapes.num_microbatches},
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              "peak_tflops": PEAK_TFLOPS, "peak_what": PEAK_WHAT,
              "flops_convention": FLOPS_CONVENTION, **result, "null_reasons": reasons}
    text = json.dumps(report, indent=None, sort_keys=False)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
