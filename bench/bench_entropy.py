"""Cost of the WD-DS entropy pass next to a bare forward pass over the same data.

Both run megatron's forward-only schedule over the same micro-batches of one model:
  - ``forward``: the logits are made and dropped (what any forward pass pays);
  - ``entropy``: the entropy pass's own step (``megatron_wmss.curriculum.entropy``): the final
    hidden states, the logits of the supervised positions only, a chunk of tokens at a time,
    their vocab-parallel entropy over the real vocabulary and the per-sample sums.
Median seconds over ``--repeats`` interleaved rounds (machine noise hits both alike) and their
ratio. Prints one JSON object.

    python bench/bench_entropy.py --layers 4 --hidden 512 --vocab 32000 --seq 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch


def _forward_step(data_iterator, model, *, entropy: bool, vocab_size: int):
    from megatron_wmss.curriculum.entropy import _forward_step as entropy_step
    from megatron_wmss.training.step import causal_attention_mask

    if entropy:  # the pass's own step: logits of the supervised positions, a chunk at a time
        return entropy_step(data_iterator, model, vocab_size=vocab_size)
    batch = next(data_iterator)
    tokens = batch["tokens"]
    s = tokens.shape[1]
    positions = torch.arange(s).expand_as(tokens)
    logits = model(tokens, positions, causal_attention_mask(s, tokens.device))

    def drop(output):
        zero = output.new_zeros((), dtype=torch.float32)
        return zero, torch.tensor(1, dtype=torch.int), {}

    return logits, drop


def _measure(args) -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_wmss.config import ModelConfig, ParallelConfig
    from megatron_wmss.models import build_gpt_model

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      ffn_hidden_size=4 * args.hidden, num_attention_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq,
                      params_dtype=args.dtype)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(cfg, ParallelConfig()).eval()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq), generator=gen)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, : args.seq // 3] = -100  # a prompt without loss
        batches.append({"tokens": tokens, "labels": labels,
                        "row": torch.arange(args.micro_batch_size)})

    def run(entropy: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=partial(_forward_step, entropy=entropy,
                                          vocab_size=args.vocab),
                data_iterator=iter(batches), model=[model],
                num_microbatches=len(batches), seq_length=args.seq,
                micro_batch_size=args.micro_batch_size, forward_only=True)
        return time.perf_counter() - start

    run(False), run(True)  # warm-up
    times = {"forward": [], "entropy": []}
    for _ in range(args.repeats):
        times["forward"].append(run(False))
        times["entropy"].append(run(True))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": vars(args), "median_s": med,
            "entropy_over_forward": med["entropy"] / med["forward"],
            "tokens_per_round": args.micro_batches * args.micro_batch_size * args.seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from megatron_wmss.platform.spawn import run_distributed

    (result,) = run_distributed(_measure, world_size=1, args=(args,), timeout=1800,
                                device="cpu")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
