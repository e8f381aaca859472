"""``wmss``: the command-line entry point. Thin: parse, then call one library function.

Exit status: 0 on success, 2 on a user error (one line on stderr, ``wmss COMMAND: error: ...``),
1 on anything unexpected (with its traceback). ``wmss --debug COMMAND`` or ``WMSS_DEBUG=1``
prints the traceback of user errors too.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence


def _env(argv: Sequence[str]) -> int:
    """Print what this process can use: versions, CUDA, Transformer Engine, Apex."""
    import importlib.metadata as md

    import torch

    from megatron_wmss import __version__
    from megatron_wmss.platform import apex_available, cuda_available, te_available
    from megatron_wmss.platform.errors import ArgumentParser

    ArgumentParser(prog="wmss env", description=_env.__doc__).parse_args(argv)

    def version(dist: str) -> Optional[str]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info = {
        "megatron_wmss": __version__,
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "cuda": cuda_available(),
        "transformer_engine": te_available(),
        "apex": apex_available(),
        "layer_spec": "transformer_engine" if te_available() else "local",
    }
    print(json.dumps(info, indent=2))
    return 0


def _train_tokenizer(argv: Sequence[str]) -> int:
    from megatron_wmss.data.train_tokenizer import main as train_tokenizer_main

    return train_tokenizer_main(list(argv), prog="wmss train-tokenizer")


def _import_hf(argv: Sequence[str]) -> int:
    from megatron_wmss.interop.cli import import_main

    return import_main(list(argv))


def _export_hf(argv: Sequence[str]) -> int:
    from megatron_wmss.interop.cli import export_main

    return export_main(list(argv))


def _extract(argv: Sequence[str]) -> int:
    from megatron_wmss.interop.cli import extract_main

    return extract_main(list(argv))


def _sft(argv: Sequence[str]) -> int:
    from megatron_wmss.training.cli import train_main

    return train_main("sft", argv)


def _joint(argv: Sequence[str]) -> int:
    from megatron_wmss.training.cli import train_main

    return train_main("joint", argv)


def _entropy(argv: Sequence[str]) -> int:
    from megatron_wmss.curriculum.entropy_cli import entropy_main

    return entropy_main(list(argv))


def _select(argv: Sequence[str]) -> int:
    from megatron_wmss.curriculum.cli import select_main

    return select_main(list(argv))


def _run(argv: Sequence[str]) -> int:
    from megatron_wmss.pipeline.cli import run_main

    return run_main(argv)


def _plan(argv: Sequence[str]) -> int:
    from megatron_wmss.plan.cli import plan_main

    return plan_main(argv)


def _eval(argv: Sequence[str]) -> int:
    from megatron_wmss.evaluation.cli import eval_main

    return eval_main(list(argv))


# name -> (help, handler taking the command's own arguments)
COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "run": ("the whole method: SFT, selection, joint training, extraction, evaluation, the "
            "SFT baseline and controls, a report (resumable stages)", _run),
    "env": ("show versions and which GPU libraries are usable", _env),
    "sft": ("phase 1: supervised fine-tuning from a YAML recipe (resumable)", _sft),
    "entropy": ("phase 2 (WD-DS): per-sample entropy of one model over the SFT data "
                "(resumable)", _entropy),
    "select": ("phase 2 (WD-DS): draw the active set from weak/strong entropy files", _select),
    "joint": ("phase 3: joint strong/weak training on the mixed logits (resumable)", _joint),
    "train-tokenizer": ("train a SentencePiece tokenizer on a text/JSONL corpus", _train_tokenizer),
    "import-hf": ("convert a Hugging Face Llama/Qwen2/Qwen3 model into a megatron checkpoint",
                  _import_hf),
    "export-hf": ("write a megatron checkpoint (or one half of a joint one) as a Hugging Face "
                  "model", _export_hf),
    "eval": ("evaluate a model with lm-eval (AIME, AMC, MATH-500, GSM8K, HumanEval, MBPP); "
             "`eval score` grades a predictions file, `eval report` compares runs", _eval),
    "plan": ("memory per rank and steps of each stage of a recipe or run config, against the "
             "GPU's memory, before a job is submitted (no GPU needed)", _plan),
    "extract": ("write the strong (or weak) model of a joint checkpoint as a single-model "
                "megatron checkpoint", _extract),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_wmss.platform.errors import DEBUG_ENV, ArgumentParser, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        prog="wmss", description="Weak-Driven Learning on megatron-core",
        epilog="Run `wmss COMMAND -h` for a command's own options. Exit status: 0 ok, 2 user "
        "error (one line on stderr), 1 unexpected error (traceback).")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every "
                        f"error, user errors included (also: {DEBUG_ENV}=1)")
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, (text, _) in COMMANDS.items()))
    debug = False
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage or the invalid-choice error, exits 2
    from megatron_wmss.platform.backends import quiet_expected_megatron_warnings

    # Here and in every spawned rank (platform.spawn), before megatron-core is imported.
    quiet_expected_megatron_warnings()
    command, handler = argv[0], COMMANDS[argv[0]][1]
    # Through the environment, so that the commands' own error handling sees it too.
    saved = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        return run_command(f"wmss {command}", lambda: handler(argv[1:]))
    finally:
        if saved is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
