"""The performance benchmarks of issue [J], side by side in one run, on the CPU by default.

1. Loss (``loss``): peak memory and time of one forward+backward of the mixed loss, both
   models trained (all four inputs get gradients), three ways, at V=151,936, T ∈ {1024, 4096},
   TP=1 and TP=2 (gloo ranks on this machine), hidden 64:
   - ``naive``, in the style of the WMSS authors' code: each model's full-vocabulary logits
     (at TP=2 gathered from the vocab shards, as an output layer with ``gather_output``
     would), stacked, mixed, upcast, ``F.cross_entropy``;
   - ``unfused``: the output layers' logit shards, then ``mixed_cross_entropy``;
   - ``chunked``: ``linear_mixed_cross_entropy`` from the hidden states.
   Each TP size runs in fresh processes that run the three in the order chunked, unfused,
   naive; peak = growth of the process's peak RSS (VmHWM, reset through
   ``/proc/self/clear_refs`` before each) over what it held before, with glibc returning every
   large block to the system on free (``MALLOC_MMAP_THRESHOLD_``), rank 0's figure. Time: the
   fastest of ``--repeats`` steps (naive: one step). At TP=2 and T=4096 the naive loss needs
   ~19 GiB per rank; it is skipped where two of them do not fit in memory.
2. Step (``step``): the joint training step (strong and weak GPT of the same shape) against a
   plain SFT step of that model, with the weak model trained and frozen, TP=1; the three
   setups step in turn, median time per step.
3. Packing (``packing``): tokens/s of an SFT step over the same samples as packed rows against
   micro-batches padded to their longest sample, lengths log-normal with the median a quarter
   of the longest (long reasoning traces).

4. Generation (``generation``): tokens/s of the megatron evaluation backend decoding 64
   prompts of mixed lengths (16-95 tokens) 16 per KV cache, longest first, as ``generate_until``
   batches them, against one at a time (greedy, 64 new tokens, a random 4-layer width-256
   Llama imported from HF), and whether the tokens are identical; where vLLM is installed
   (here, or in .venv-vllm: make venv-vllm), vLLM's tokens/s on the same HF model and prompts
   (its own scheduling, eager, fp32).

    python bench/run.py [--json] [--only loss,step,packing,generation] [--quick]

Prints a summary to stderr and, with ``--json``, one JSON object on stdout whose top-level
keys are the headline ratios (T=4096, TP=1 for the loss) and ``details`` every figure.
``--quick`` shrinks every shape (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a fresh clone without installing

IMPLS = ("chunked", "unfused", "naive")  # smallest first: nothing lingers into a later peak
TARGETS = {"chunked_vs_naive_peak_memory": ("<=", 1 / 8), "chunked_vs_unfused_time": ("<=", 1.2),
           "joint_vs_sft_step_time": ("<=", 2.05), "frozen_joint_vs_sft_step_time": ("<=", 1.4),
           "packed_vs_padded_tokens_per_s": (">=", 1.5),
           "batched_vs_sequential_generation_tokens_per_s": (">=", 4.0)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


from megatron_wmss.platform.peak_memory import (  # noqa: E402  (VmHWM, clear_refs)
    reset_peak_rss as _reset_peak,
    status_kib as _status_kib,
)


def _use_all_cores() -> None:
    """run_distributed gives each rank one thread; share the cores among the ranks instead."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))


# ----------------------------------------------------------------------------------- loss --

def _loss_rank(vocab: int, hidden: int, token_counts: list[int], repeats: int,
               naive_skip: list[int]) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_wmss.loss import linear_mixed_cross_entropy, mixed_cross_entropy

    warnings.filterwarnings("ignore", category=FutureWarning)  # megatron's all_gather call
    _use_all_cores()
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    rank, lam, local = ps.get_tensor_model_parallel_rank(), 0.5, vocab // tp
    out = {}
    for tokens in token_counts:
        gen = torch.Generator().manual_seed(tokens)  # every rank: the same tokens and weights
        hs, hw = (torch.randn(tokens, hidden, generator=gen) for _ in range(2))
        ws, ww = ((0.05 * torch.randn(vocab, hidden, generator=gen))[rank * local:
                                                                    (rank + 1) * local]
                  for _ in range(2))
        inputs = [x.contiguous().requires_grad_() for x in (hs, hw, ws, ww)]
        target = torch.randint(0, vocab, (tokens,), generator=gen)

        def step(impl):
            hs, hw, ws, ww = inputs
            if impl == "naive":
                zs, zw = hs @ ws.T, hw @ ww.T
                if tp > 1:
                    zs = gather_from_tensor_model_parallel_region(zs)
                    zw = gather_from_tensor_model_parallel_region(zw)
                stacked = torch.stack([zs, zw])
                mixed = (lam * stacked[0] + (1 - lam) * stacked[1]).float()
                loss = F.cross_entropy(mixed, target, reduction="none")
            elif impl == "unfused":
                loss = mixed_cross_entropy(hs @ ws.T, hw @ ww.T, target, lam, tp_group=group)
            else:
                loss = linear_mixed_cross_entropy(hs, hw, ws, ww, target, lam, tp_group=group)
            loss.mean().backward()
            for x in inputs:
                x.grad = None
            return float(loss.detach().mean())

        for impl in IMPLS:
            if impl == "naive" and tokens in naive_skip:
                continue
            dist.barrier()
            _reset_peak()
            base = _status_kib("VmRSS")
            start = time.perf_counter()
            loss = step(impl)
            times = [time.perf_counter() - start]
            peak = (_status_kib("VmHWM") - base) * 1024
            for _ in range(repeats - 1 if impl != "naive" else 0):
                dist.barrier()
                start = time.perf_counter()
                step(impl)
                times.append(time.perf_counter() - start)
            out[f"{impl}@{tokens}"] = {"peak_bytes": peak, "seconds": min(times), "loss": loss}
    return out


def bench_loss(args) -> dict:
    from megatron_wmss.testing import run_distributed

    # glibc: every block >= 64 KiB is its own mapping, unmapped on free, so a process's
    # earlier (freed) tensors cannot hide a later peak.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    vocab, hidden = (4096, 16) if args.quick else (151936, 64)
    token_counts = [64, 256] if args.quick else [1024, 4096]
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    details = {}
    for tp in (1, 2):
        # The naive loss peaks at ~9.3 [T, V] fp32 tensors per rank (5.8 GiB at T=1024; at
        # T=4096 it was OOM-killed on a 24 GiB machine): skip it where tp ranks of 10 would
        # not fit in 90% of the memory.
        skip = [t for t in token_counts if tp * 10 * t * vocab * 4 / 2**30 > 0.9 * total_gib]
        _log(f"loss: TP={tp}, V={vocab}, T={token_counts} ...")
        runs = run_distributed(_loss_rank, world_size=tp, tp=tp, timeout=1200,
                               args=(vocab, hidden, token_counts, args.repeats, skip))[0]
        for tokens in token_counts:
            r = {impl: runs.get(f"{impl}@{tokens}") for impl in IMPLS}
            entry = {impl: ({"peak_gib": v["peak_bytes"] / 2**30, "seconds": v["seconds"]}
                            if v else {"skipped": f"{tp} ranks of ~{10 * tokens * vocab * 4 / 2**30:.0f}"
                                                  f" GiB do not fit in {total_gib:.0f} GiB"})
                     for impl, v in r.items()}
            entry["chunked_vs_unfused_time"] = r["chunked"]["seconds"] / r["unfused"]["seconds"]
            entry["chunked_vs_unfused_peak_memory"] = (r["chunked"]["peak_bytes"]
                                                       / r["unfused"]["peak_bytes"])
            if r["naive"]:
                entry["chunked_vs_naive_peak_memory"] = (r["chunked"]["peak_bytes"]
                                                         / r["naive"]["peak_bytes"])
                entry["naive_vs_unfused_time"] = r["naive"]["seconds"] / r["unfused"]["seconds"]
            entry["max_loss_difference"] = max(abs(v["loss"] - r["unfused"]["loss"])
                                               for v in r.values() if v)
            details[f"tp{tp}_t{tokens}"] = entry
            _log(f"  T={tokens}: " + ", ".join(
                f"{impl} {e['peak_gib']:.2f} GiB {e['seconds']:.2f} s" if "peak_gib" in e
                else f"{impl} skipped" for impl, e in ((i, entry[i]) for i in IMPLS)))
    return {"vocab": vocab, "hidden": hidden, "repeats": args.repeats, "runs": details}


# ----------------------------------------------------------------------------------- step --

def _tiny_gpt(quick: bool, vocab: int, seq: int):
    from megatron_wmss.config import ModelConfig

    if quick:
        return ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64,
                           num_attention_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                           params_dtype="float32")
    return ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=704,
                       num_attention_heads=4, num_query_groups=2, vocab_size=vocab,
                       max_position_embeddings=seq, params_dtype="float32")


def _constant_lr_optim():
    from megatron_wmss.config import OptimConfig

    return OptimConfig(lr=1e-4, warmup_fraction=0.0, lr_schedule="constant")


def _random_batches(n: int, micro: int, seq: int, vocab: int, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (micro, seq), generator=gen)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, : seq // 4] = -100  # a prompt
        labels[:, -1] = -100
        batches.append({"tokens": tokens, "labels": labels})
    return batches


def _step_rank(quick: bool, rounds: int) -> dict:
    from megatron_wmss.config import MixConfig, ParallelConfig
    from megatron_wmss.training import setup_training, train_step

    _use_all_cores()
    vocab, seq, micro, n_micro = (512, 32, 2, 2) if quick else (8192, 256, 4, 2)
    cfg = _tiny_gpt(quick, vocab, seq)
    optim = _constant_lr_optim()
    setups = {"sft": setup_training(cfg, ParallelConfig(), optim, 100),
              "joint": setup_training(cfg, ParallelConfig(), optim, 100, mix=MixConfig()),
              "frozen_joint": setup_training(cfg, ParallelConfig(), optim, 100,
                                             mix=MixConfig(freeze_weak=True))}
    batches = _random_batches(n_micro, micro, seq, vocab, seed=0)
    times = {name: [] for name in setups}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, setup in setups.items():
            start = time.perf_counter()
            train_step(setup, iter(batches), num_microbatches=n_micro, micro_batch_size=micro,
                       seq_length=seq)
            if round_:
                times[name].append(time.perf_counter() - start)
    impl = setups["sft"].unwrapped.cross_entropy_impl
    return {"seconds": {name: statistics.median(t) for name, t in times.items()},
            "tokens_per_step": n_micro * micro * seq, "cross_entropy_impl": impl,
            "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": vocab}}


def bench_step(args) -> dict:
    from megatron_wmss.testing import run_distributed

    _log("step: SFT, joint, joint with the weak model frozen ...")
    out = run_distributed(_step_rank, world_size=1, tp=1, timeout=1200,
                          args=(args.quick, 2 if args.quick else 6))[0]
    s = out["seconds"]
    out["joint_vs_sft_step_time"] = s["joint"] / s["sft"]
    out["frozen_joint_vs_sft_step_time"] = s["frozen_joint"] / s["sft"]
    _log(f"  sft {s['sft']:.3f} s, joint {s['joint']:.3f} s, frozen {s['frozen_joint']:.3f} s")
    return out


# -------------------------------------------------------------------------------- packing --

def _lengths(n: int, longest: int, seed: int) -> list[int]:
    """Log-normal with the median a quarter of ``longest``, clipped to [16, longest]."""
    import numpy as np

    gen = np.random.default_rng(seed)
    raw = gen.lognormal(math.log(longest / 4), 0.75, n)
    return [int(x) for x in np.clip(raw, 16, longest)]


def _packing_rank(quick: bool, rounds: int) -> dict:
    import numpy as np

    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.data.collate import collate_sft
    from megatron_wmss.data.packing import collate_packed, pack_by_length
    from megatron_wmss.training import setup_training, train_step

    _use_all_cores()
    # Rows of 512 tokens with hidden 256: attention / linear FLOPs per token s/(6h) = 0.33, as
    # for a 4B model (h=2560) at 4096 tokens (0.27); masked attention over a packed row costs
    # s² whatever its samples, so a longer row at this small width would mostly time that.
    vocab, longest, n, micro = (512, 64, 16, 4) if quick else (8192, 512, 64, 4)
    lengths = _lengths(n, longest, seed=0)
    gen = np.random.default_rng(1)
    samples = [{"input_ids": gen.integers(1, vocab, k).astype(np.int32),
                "assistant_mask": np.arange(k) >= k // 4, "idx": i}
               for i, k in enumerate(lengths)]
    padded = [collate_sft(samples[i:i + micro], pad_id=0) for i in range(0, n, micro)]
    packs = pack_by_length(lengths, longest)
    packed = [collate_packed([[samples[j] for j in p]], pad_id=0, length=longest)
              for p in packs]
    cfg = _tiny_gpt(quick, vocab, longest)
    setup = setup_training(cfg, ParallelConfig(), _constant_lr_optim(), 100)
    real = sum(lengths)
    times = {"padded": [], "packed": []}
    for round_ in range(rounds + 1):
        for name, batches, size in (("padded", padded, micro), ("packed", packed, 1)):
            start = time.perf_counter()
            train_step(setup, iter(batches), num_microbatches=len(batches),
                       micro_batch_size=size)
            if round_:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {"samples": n, "longest": longest, "median_length": float(np.median(lengths)),
            "real_tokens": real,
            "row_tokens": {"padded": int(sum(b["tokens"].numel() for b in padded)),
                           "packed": len(packed) * longest},
            "rows": {"padded": n, "packed": len(packed)},
            "tokens_per_s": {name: real / s for name, s in seconds.items()}}


def bench_packing(args) -> dict:
    from megatron_wmss.testing import run_distributed

    _log("packing: packed rows against padded micro-batches ...")
    out = run_distributed(_packing_rank, world_size=1, tp=1, timeout=1200,
                          args=(args.quick, 1 if args.quick else 3))[0]
    tps = out["tokens_per_s"]
    out["packed_vs_padded_tokens_per_s"] = tps["packed"] / tps["padded"]
    _log(f"  padded {tps['padded']:.0f} tok/s, packed {tps['packed']:.0f} tok/s "
         f"({out['row_tokens']['padded']} vs {out['row_tokens']['packed']} row tokens for "
         f"{out['real_tokens']} real)")
    return out


class _IdsOnly:
    """The generation benchmark's tokenizer: ids only (no stop strings, so no text)."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def encode(self, text):  # pragma: no cover - never called without stop strings
        raise NotImplementedError

    decode = chat_pieces = encode


GENERATE_BATCH = 16  # the megatron backend's default generate_batch_size


def _generation_shape(quick: bool) -> dict:
    if quick:
        return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=32, vocab_size=512)
    return dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=8192)


def _generation_model(directory: str, quick: bool) -> None:
    """A random Llama of the step benchmark's shape, saved as an HF directory (both engines
    load it); embeddings scaled up so that greedy choices are not ties at 1e-7."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(**_generation_shape(quick), max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)
        model.lm_head.weight.mul_(50)
    model.save_pretrained(directory)


def _generation_prompts(quick: bool) -> tuple[list[list[int]], int]:
    """Prompts of mixed lengths (16-95 tokens) and the new tokens per prompt; the last id is
    kept out of them and out of the megatron backend's choices (it stands for EOS), so every
    row generates its whole budget."""
    import torch

    vocab = _generation_shape(quick)["vocab_size"]
    batch, new = (8, 8) if quick else (4 * GENERATE_BATCH, 64)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 96, (batch,), generator=gen).tolist()
    return [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in lengths], new


def _generation_rank(directory: str, quick: bool, rounds: int) -> dict:
    from megatron_wmss.evaluation.backend import EvalTokenizer, MegatronLM
    from megatron_wmss.interop import import_hf
    from megatron_wmss.interop.convert import load_checkpoint_model

    _use_all_cores()
    import_hf(directory, f"{directory}/megatron")
    model, cfg = load_checkpoint_model(f"{directory}/megatron")
    prompts, new = _generation_prompts(quick)
    eos = cfg.vocab_size - 1
    lm = MegatronLM(model.eval(), EvalTokenizer("ids", chat=_IdsOnly(eos)), eos,
                    max_length=256, generate_batch_size=GENERATE_BATCH)
    # As generate_until batches them: longest first, GENERATE_BATCH per KV cache.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + GENERATE_BATCH] for i in range(0, len(order), GENERATE_BATCH)]
    times = {"sequential": [], "batched": []}
    outputs = {}
    for round_ in range(rounds + 1):
        for name in ("sequential", "batched"):
            start = time.perf_counter()
            if name == "batched":
                out = [None] * len(prompts)
                for batch in batches:
                    for i, ids in zip(batch, lm.generate_batch([prompts[i] for i in batch],
                                                               new)):
                        out[i] = ids
            else:
                out = [lm.generate_tokens(p, new) for p in prompts]
            if round_:
                times[name].append(time.perf_counter() - start)
            outputs[name] = out
    tokens = sum(len(o) for o in outputs["batched"])
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {"prompts": len(prompts), "batch": GENERATE_BATCH,
            "prompt_lengths": [len(p) for p in prompts],
            "max_new_tokens": new, "generated_tokens": tokens,
            "identical": outputs["batched"] == outputs["sequential"],
            "tokens_per_s": {name: tokens / s for name, s in seconds.items()}}


_VLLM_GENERATION = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[3])
from megatron_wmss.evaluation.vllm_support import prepare_vllm
args = prepare_vllm({})
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", seed=0, skip_tokenizer_init=True,
          max_model_len=256, **args)
prompts, new = json.loads(sys.argv[2])
params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
requests = [{"prompt_token_ids": p} for p in prompts]
times = []
for round_ in range(4):
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    if round_:
        times.append(time.perf_counter() - start)
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("VLLM=" + json.dumps({"tokens": tokens, "tokens_per_s": tokens / statistics.median(times)}))
"""


def _vllm_python() -> str | None:
    """An interpreter with vLLM: this one, or the project's .venv-vllm (make venv-vllm)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = os.path.join(os.path.dirname(HERE), ".venv-vllm", "bin", "python")
    if os.path.isfile(candidate) and subprocess.run(
            [candidate, "-c", "import vllm"], capture_output=True).returncode == 0:
        return candidate
    return None


def _vllm_generation(directory: str, quick: bool) -> dict | None:
    import subprocess

    python = _vllm_python()
    if python is None or quick:
        return None
    prompts, new = _generation_prompts(quick)
    done = subprocess.run([python, "-c", _VLLM_GENERATION, directory,
                           json.dumps([prompts, new]), os.path.dirname(HERE)],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode:
        raise RuntimeError(f"vLLM generation failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("VLLM=")[-1])


def bench_generation(args) -> dict:
    import tempfile

    from megatron_wmss.testing import run_distributed

    _log("generation: batched KV-cache decoding against one prompt at a time (and vLLM) ...")
    with tempfile.TemporaryDirectory() as directory:
        _generation_model(directory, args.quick)
        out = run_distributed(_generation_rank, world_size=1, tp=1, timeout=1200,
                              args=(directory, args.quick, 1 if args.quick else 2))[0]
        vllm = _vllm_generation(directory, args.quick)
    tps = out["tokens_per_s"]
    out["batched_vs_sequential_generation_tokens_per_s"] = tps["batched"] / tps["sequential"]
    _log(f"  {out['prompts']} prompts: one by one {tps['sequential']:.0f} tok/s, "
         f"{out['batch']} per KV cache {tps['batched']:.0f} tok/s; identical tokens: "
         f"{out['identical']}")
    if vllm is not None:
        out["vllm"] = vllm
        out["vllm_vs_megatron_generation_tokens_per_s"] = vllm["tokens_per_s"] / tps["batched"]
        _log(f"  vLLM, same model and prompts: {vllm['tokens_per_s']:.0f} tok/s")
    return out


# ----------------------------------------------------------------------------------- main --

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--only", default="loss,step,packing,generation",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed loss steps per implementation (the fastest counts)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes: checks that the script runs, measures nothing")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    known = {"loss": bench_loss, "step": bench_step, "packing": bench_packing,
             "generation": bench_generation}
    unknown = sorted(set(sections) - set(known))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {sorted(known)}")
    import torch

    started = time.perf_counter()
    details = {name: known[name](args) for name in sections}
    out: dict = {}
    if "loss" in details:
        runs = details["loss"]["runs"]
        tp1 = sorted((k for k in runs if k.startswith("tp1_")), key=lambda k: int(k[5:]))
        out["chunked_vs_unfused_time"] = runs[tp1[-1]]["chunked_vs_unfused_time"]
        # The largest T at which the naive loss fits in this machine's memory.
        with_naive = [k for k in tp1 if "chunked_vs_naive_peak_memory" in runs[k]]
        out["chunked_vs_naive_peak_memory"] = (
            runs[with_naive[-1]]["chunked_vs_naive_peak_memory"] if with_naive else None)
        out["chunked_vs_naive_peak_memory_at_tokens"] = (
            int(with_naive[-1][5:]) if with_naive else None)
    if "step" in details:
        out["joint_vs_sft_step_time"] = details["step"]["joint_vs_sft_step_time"]
        out["frozen_joint_vs_sft_step_time"] = details["step"]["frozen_joint_vs_sft_step_time"]
    if "packing" in details:
        out["packed_vs_padded_tokens_per_s"] = details["packing"]["packed_vs_padded_tokens_per_s"]
    if "generation" in details:
        for key in ("batched_vs_sequential_generation_tokens_per_s",
                    "vllm_vs_megatron_generation_tokens_per_s"):
            if key in details["generation"]:
                out[key] = details["generation"][key]
    out["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        if out.get(key) is not None:
            met = out[key] <= bound if op == "<=" else out[key] >= bound
            out["targets"][key] = {"target": f"{op} {bound:.3g}", "met": bool(met)}
    out["details"] = details
    out["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "quick": args.quick,
                      "seconds": time.perf_counter() - started}
    for key, value in out["targets"].items():
        _log(f"{key} = {out[key]:.3f} (target {value['target']}: "
             f"{'met' if value['met'] else 'missed'})")
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
