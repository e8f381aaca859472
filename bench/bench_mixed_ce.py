"""Cost of the mixed cross-entropy next to the losses it replaces, measured side by side.

Compares, on the same ``[T, V]`` logits (one process, whole vocabulary local):
  - ``mixed``: ``megatron_wmss.loss.mixed_cross_entropy`` of a strong and a weak model;
  - ``naive_mixed``: autograd of ``F.cross_entropy(λ·z_s + (1−λ)·z_w)`` in fp32;
  - ``megatron_ce``: megatron-core's ``vocab_parallel_cross_entropy`` of one model on an fp32
    copy of its logits, as ``GPTModel`` calls it (what SFT pays for its loss).
For each: median forward+backward seconds over ``--repeats`` interleaved rounds (so machine
noise hits all alike), the ratio to ``megatron_ce``, and the bytes autograd keeps for backward
(counted exactly with saved-tensor hooks). Prints one JSON object.

    python bench/bench_mixed_ce.py --tokens 2048 --vocab 32768 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_wmss.loss import mixed_cross_entropy


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    strong = (3 * torch.randn(args.tokens, args.vocab, generator=gen)).to(dtype)
    weak = (3 * torch.randn(args.tokens, args.vocab, generator=gen)).to(dtype)
    target = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    lam = 0.5

    def mixed():
        s, w = strong.clone().requires_grad_(), weak.clone().requires_grad_()
        return lambda: mixed_cross_entropy(s, w, target, lam).sum().backward()

    def naive_mixed():
        s, w = strong.clone().requires_grad_(), weak.clone().requires_grad_()
        return lambda: F.cross_entropy(lam * s.float() + (1 - lam) * w.float(), target,
                                       reduction="sum").backward()

    def megatron_ce():
        # As megatron's GPTModel calls it: on an fp32 copy of the (bf16) logits.
        s = strong.clone().requires_grad_()
        return lambda: vocab_parallel_cross_entropy(s.float(), target).sum().backward()

    cases = {"mixed": mixed, "naive_mixed": naive_mixed, "megatron_ce": megatron_ce}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, make in cases.items():
            run = make()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    report = {
        "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seconds_median": medians,
        "time_ratio_to_megatron_ce": {n: medians[n] / medians["megatron_ce"] for n in medians},
        "saved_for_backward_bytes": {n: _saved_bytes(make()) for n, make in cases.items()},
        "fp32_logits_bytes": args.tokens * args.vocab * 4,
    }
    print(json.dumps(report, indent=2))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
