"""``wmss sft`` and ``wmss joint``: parse, check the recipe, start or join the ranks, train.

    wmss sft   --config RECIPE.yaml [section.field=value ...] [--run-dir DIR] [--nproc-per-node N]
    wmss joint --config RECIPE.yaml ...
    wmss sft   --config RECIPE.yaml [overrides] --print-config   # check, print, start nothing

Under torchrun or srun each process is one rank (see :mod:`megatron_wmss.platform.launch`);
``--nproc-per-node N`` starts N local ranks itself (NCCL with a GPU each where there are N
GPUs, gloo on CPU). The recipe is checked in full before any rank starts or anything is
written. Exit status: 0 done, 75 (:data:`PREEMPTION_EXIT_CODE`) saved after SIGTERM / SIGUSR1
/ the time limit (rerun the same command to resume; the Slurm script requeues on it), 74
(:data:`~megatron_wmss.training.state.CHECKPOINT_IO_EXIT_CODE`) checkpoint storage: no space
left for a checkpoint, or no intact checkpoint to resume from (one line naming the directory;
rerun once space is freed or the checkpoints restored), 3 stopped on non-finite steps, 2 a bad
recipe or input, 1 anything unexpected.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from megatron_wmss.platform.errors import ArgumentParser

__all__ = ["NONFINITE_EXIT_CODE", "train_main"]

NONFINITE_EXIT_CODE = 3
# training.state's CheckpointIOError subclasses, by the name a spawned rank's failure carries.
_STORAGE_ERRORS = ("CheckpointSpaceError", "DamagedCheckpointError")
_A_MONTH = 30 * 24 * 3600.0


def _parser(command: str) -> ArgumentParser:
    what = {"sft": "phase 1: supervised fine-tuning of one model",
            "joint": "phase 3: joint training of the strong and the weak model on their mixed "
                     "logits"}[command]
    parser = ArgumentParser(prog=f"wmss {command}", description=what)
    parser.add_argument("--config", required=True, help="YAML recipe (examples/recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="recipe overrides, values parsed as YAML (e.g. optim.lr=1e-5)")
    parser.add_argument("--run-dir", default=None,
                        help="where the run writes (default: the recipe's trainer.run_dir); a "
                        "rerun on the same directory resumes")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="start N local ranks (default: one process, or the ranks of "
                        "torchrun / srun)")
    parser.add_argument("--print-config", action="store_true",
                        help="check the recipe, print it resolved as YAML (what RUN_DIR/"
                        "config.yaml will hold) and exit without training")
    return parser


def _train_rank(recipe) -> tuple[int, str]:
    """One rank's run (megatron's parallel state is set up): (exit code, message)."""
    from megatron_wmss.training.state import CHECKPOINT_IO_EXIT_CODE, CheckpointIOError
    from megatron_wmss.training.trainer import NonFiniteTrainingError, run_training

    try:
        return run_training(recipe), ""
    except NonFiniteTrainingError as err:
        return NONFINITE_EXIT_CODE, str(err)
    except CheckpointIOError as err:
        if not err.every_rank:
            raise  # its peers wait in a collective: the launcher ends them once this rank fails
        return CHECKPOINT_IO_EXIT_CODE, str(err)


def _print_resolved(recipe) -> None:
    """The recipe as the run will resolve it: the tokenizer fills in the vocabulary size."""
    import yaml

    from megatron_wmss.data import load_tokenizer
    from megatron_wmss.training.recipe import default_tokenizer, resolve_model

    resolve_model(recipe, load_tokenizer(default_tokenizer(recipe)).vocab_size)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")


def train_main(command: str, argv: Sequence[str]) -> int:
    from megatron_wmss.platform.launch import rank_info_from_env
    from megatron_wmss.training.recipe import check_init_architectures, load_recipe

    # Intermixed: overrides may stand before, between or after the options.
    args = _parser(command).parse_intermixed_args(list(argv))
    recipe = load_recipe(command, args.config, args.overrides, args.run_dir)
    check_init_architectures(recipe)
    if args.print_config:
        _print_resolved(recipe)
        return 0
    tp = recipe.parallel.tensor_model_parallel_size
    pp = recipe.parallel.pipeline_model_parallel_size
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        if rank_info_from_env().launcher != "single":
            raise ValueError("--nproc-per-node starts ranks itself; under torchrun or srun "
                             "leave it out (each launched process is one rank)")
        if args.nproc_per_node % (tp * pp):
            raise ValueError(f"--nproc-per-node={args.nproc_per_node} is not a multiple of "
                             f"tensor x pipeline parallel size = {tp} x {pp}")
        # The global batch must split into whole micro-batches per data-parallel rank: say so
        # here, before any rank starts.
        recipe.num_microbatches(args.nproc_per_node // (tp * pp))
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < gpus < args.nproc_per_node:
            raise ValueError(f"--nproc-per-node={args.nproc_per_node} but this machine has "
                             f"{gpus} GPU(s): one rank per GPU (or hide them with "
                             "CUDA_VISIBLE_DEVICES= to train on CPU)")
        from megatron_wmss.platform.spawn import DistributedRunError, run_distributed
        from megatron_wmss.training.state import CHECKPOINT_IO_EXIT_CODE

        try:
            results = run_distributed(_train_rank, world_size=args.nproc_per_node, tp=tp,
                                      pp=pp, args=(recipe,), timeout=_A_MONTH, device="auto",
                                      forward_signals=(signal.SIGTERM, signal.SIGUSR1))
        except DistributedRunError as err:  # a storage error raised on one rank alone
            failure = next((f for f in err.failures if f.exc_type in _STORAGE_ERRORS), None)
            if failure is None:
                raise
            print(f"wmss {command}: error: {failure.exc_message}", file=sys.stderr)
            return CHECKPOINT_IO_EXIT_CODE
    else:
        from megatron_wmss.platform.launch import distributed_from_env
        from megatron_wmss.training.state import CHECKPOINT_IO_EXIT_CODE, CheckpointIOError

        try:
            with distributed_from_env(tp, pp):
                results = [_train_rank(recipe)]
        except CheckpointIOError as err:  # raised on this rank alone: it says so itself
            print(f"wmss {command}: error: {err}", file=sys.stderr)
            return CHECKPOINT_IO_EXIT_CODE
    code = max(code for code, _ in results)
    message = next((m for _, m in results if m), "")
    if message and rank_info_from_env().rank == 0:
        print(f"wmss {command}: error: {message}", file=sys.stderr)
    return code
