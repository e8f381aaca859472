"""Peak memory and time of the mixed loss three ways, at Qwen3's vocabulary, side by side.

  - ``naive``: in the style of the WMSS authors' code: both models' logits from their output
    layers, stacked, mixed, upcast, full-vocabulary ``F.cross_entropy`` (autograd);
  - ``unfused``: logits from the output layers, then ``megatron_wmss.loss.mixed_cross_entropy``;
  - ``chunked``: ``megatron_wmss.loss.linear_mixed_cross_entropy`` from the hidden states.
Each (implementation, T) runs in a fresh subprocess (TP=1, one process): its peak memory is
the growth of its peak RSS (VmHWM, reset just before) over one forward+backward beyond what
it held before (weights, hidden states, targets), and its time the median of ``--repeats`` steps. Both models
are trained (all four inputs get gradients). Prints one JSON object with the ratios.

    python bench/bench_linear_ce.py --tokens 1024,4096 [--vocab 151936 --hidden 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPLS = ("naive", "unfused", "chunked")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (Linux clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(impl: str, tokens: int, vocab: int, hidden: int, repeats: int, lam: float,
           chunk: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron_wmss.loss import linear_mixed_cross_entropy, mixed_cross_entropy

    torch.manual_seed(0)
    inputs = [torch.randn(tokens, hidden).requires_grad_(), torch.randn(tokens, hidden
                                                                         ).requires_grad_(),
              (0.05 * torch.randn(vocab, hidden)).requires_grad_(),
              (0.05 * torch.randn(vocab, hidden)).requires_grad_()]
    target = torch.randint(0, vocab, (tokens,))

    def step():
        hs, hw, ws, ww = inputs
        if impl == "naive":
            stacked = torch.stack([hs @ ws.T, hw @ ww.T])
            mixed = (lam * stacked[0] + (1 - lam) * stacked[1]).float()
            loss = F.cross_entropy(mixed, target, reduction="none")
        elif impl == "unfused":
            loss = mixed_cross_entropy(hs @ ws.T, hw @ ww.T, target, lam)
        else:
            loss = linear_mixed_cross_entropy(hs, hw, ws, ww, target, lam, chunk_size=chunk)
        loss.mean().backward()
        for x in inputs:
            x.grad = None
        return float(loss.detach().mean())

    _reset_peak()
    base = _status_kib("VmRSS")
    step()  # warm-up, and the step whose peak is measured
    peak = _status_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "tokens": tokens, "peak_bytes": (peak - base) * 1024,
            "seconds": statistics.median(times), "loss": loss}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mix-lambda", type=float, default=0.5)
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="tokens per chunk of the chunked loss (default: its own)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = _child(args.child[0], int(args.child[1]), args.vocab, args.hidden,
                        args.repeats, args.mix_lambda, args.chunk_tokens)
        print(json.dumps(result))
        return result

    runs = {}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for impl in IMPLS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", impl, str(tokens), "--vocab",
                 str(args.vocab), "--hidden", str(args.hidden), "--repeats", str(args.repeats),
                 "--mix-lambda", str(args.mix_lambda)]
                + (["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []),
                capture_output=True, text=True, check=True)
            runs[f"{impl}@{tokens}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{impl:8s} T={tokens:5d}: peak {runs[f'{impl}@{tokens}']['peak_bytes'] / 2**30:.2f}"
                  f" GiB, {runs[f'{impl}@{tokens}']['seconds']:.2f} s", file=sys.stderr)
    out = {"vocab": args.vocab, "hidden": args.hidden, "chunk_tokens": args.chunk_tokens,
           "threads": __import__("torch").get_num_threads(), "runs": runs, "ratios": {}}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        r = {impl: runs[f"{impl}@{tokens}"] for impl in IMPLS}
        out["ratios"][str(tokens)] = {
            "chunked_vs_naive_peak_memory": r["chunked"]["peak_bytes"] / r["naive"]["peak_bytes"],
            "chunked_vs_unfused_peak_memory":
                r["chunked"]["peak_bytes"] / r["unfused"]["peak_bytes"],
            "chunked_vs_unfused_time": r["chunked"]["seconds"] / r["unfused"]["seconds"],
            "naive_vs_unfused_time": r["naive"]["seconds"] / r["unfused"]["seconds"],
            "max_loss_difference": max(abs(r[i]["loss"] - r["naive"]["loss"]) for i in IMPLS)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
