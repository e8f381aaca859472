"""``wmss entropy``: the WD-DS entropy pass of one model over the SFT data (resumable).

    wmss entropy --model CKPT --data train.jsonl --out runs/h_weak.jsonl [--nproc-per-node N]
                 [--tp N] [--pp N] [--micro-batch-size B] [--max-length L] [--tokenizer PATH]
                 [--positions next-token|authors]

Under torchrun or srun each process is one rank; ``--nproc-per-node N`` starts N local ranks.
A rerun after a kill recomputes only the shards that were not finished.
"""

from __future__ import annotations

from typing import Sequence

from megatron_wmss.platform.errors import ArgumentParser, positive_int, run_command

__all__ = ["entropy_main"]

_A_MONTH = 30 * 24 * 3600.0


def _entropy_rank(job) -> str:
    from megatron_wmss.curriculum.entropy import compute_entropies

    return str(compute_entropies(job))



def entropy_main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="wmss entropy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="megatron checkpoint (single-model or joint) or HF model directory")
    parser.add_argument("--which", choices=("strong", "weak"), default=None,
                        help="the half of a joint checkpoint to score (default strong)")
    parser.add_argument("--data", required=True, nargs="+", help="SFT data files/directories")
    parser.add_argument("--out", required=True, help="output .jsonl or .parquet")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (default: the one stored with the checkpoint)")
    parser.add_argument("--schema", default="auto", help="data schema (see README: Data)")
    parser.add_argument("--max-length", type=positive_int, default=4096)
    parser.add_argument("--micro-batch-size", type=positive_int, default=8)
    parser.add_argument("--shard-size", type=positive_int, default=1024,
                        help="samples per resumable shard")
    parser.add_argument("--positions", choices=("next-token", "authors"), default="next-token",
                        help="next-token: the logits predicting supervised tokens (the paper); "
                             "authors: the logits at the answer tokens, header included (the "
                             "authors' code, a reproduction mode)")
    parser.add_argument("--tp", type=positive_int, default=1)
    parser.add_argument("--pp", type=positive_int, default=1)
    parser.add_argument("--nproc-per-node", type=positive_int, default=None)
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.curriculum.entropy import EntropyJob
        from megatron_wmss.data.config import DataConfig, TokenizerConfig
        from megatron_wmss.data.sources import resolve_paths
        from megatron_wmss.platform.launch import distributed_from_env, rank_info_from_env

        resolve_paths(args.data)  # a missing data file fails here, before any rank starts
        job = EntropyJob(
            model=args.model, which=args.which, out=args.out, shard_size=args.shard_size,
            positions=args.positions,
            data=DataConfig(paths=args.data, schema=args.schema, max_length=args.max_length,
                            micro_batch_size=args.micro_batch_size, shuffle=False),
            tokenizer=TokenizerConfig(path=args.tokenizer) if args.tokenizer else None)
        if args.nproc_per_node is not None:
            if args.nproc_per_node % (args.tp * args.pp):
                raise ValueError(f"--nproc-per-node={args.nproc_per_node} is not a multiple of "
                                 f"--tp x --pp = {args.tp} x {args.pp}")
            from megatron_wmss.platform.spawn import run_distributed

            run_distributed(_entropy_rank, world_size=args.nproc_per_node, tp=args.tp,
                            pp=args.pp, args=(job,), timeout=_A_MONTH, device="auto")
        else:
            with distributed_from_env(args.tp, args.pp):
                _entropy_rank(job)
        if rank_info_from_env().rank == 0:
            print(f"wrote {args.out}")

    return run_command(parser.prog, body)
