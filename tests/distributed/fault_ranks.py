"""Stages of a WMSS run with a fault injected on one rank, for the rank-failure tests.

Each scenario calls the real stage code on every rank of an initialized process group, with one
function replaced on rank ``fail_rank`` only by one that raises ``RuntimeError(FAULT)`` (a bug,
not a user error: the kind the old code did not share). Used in two ways:
- in-process, under the gloo test harness (``tests/distributed/test_rank_failures.py``);
- as one rank of a torchrun/srun-style job, each rank its own process reading RANK,
  WORLD_SIZE, MASTER_ADDR and MASTER_PORT like ``wmss``'s per-rank commands:

      python -m tests.distributed.fault_ranks STAGE FAIL_RANK WORKDIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAULT = "injected fault {where} on rank {rank}"
READY = "fault_ranks: process group up at"


_UNDO: list = []


def _inject(module, name: str, fail_rank: int, where: str, *, after: bool = False) -> None:
    """Make ``module.name`` raise on rank ``fail_rank`` (after running when ``after``), until
    :func:`_restore`."""
    import torch.distributed as dist

    real = getattr(module, name)
    _UNDO.append(lambda: setattr(module, name, real))

    def faulty(*args, **kwargs):
        value = real(*args, **kwargs) if after else None
        if dist.get_rank() == fail_rank:
            raise RuntimeError(FAULT.format(where=where, rank=fail_rank))
        return value if after else real(*args, **kwargs)

    setattr(module, name, faulty)


def _restore() -> None:
    while _UNDO:
        _UNDO.pop()()


def _pipeline_config(workdir: Path):
    from megatron_wmss.pipeline.config import EvalSettings, PipelineConfig

    base = workdir / "base"  # an HF directory as far as the evaluation stage can tell
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}\n")
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / "local_math.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return PipelineConfig(run_dir=str(workdir / "run"), base=str(base),
                          training={"data": {"paths": []}},
                          eval=EvalSettings(tasks=["local_math"], data_dir=str(workdir / "eval")))


def tokenize(fail_rank: int, workdir: Path) -> None:
    """The trainer's tokenization: rank 0 fills the cache, the other ranks then read it."""
    import megatron_wmss.data as data
    from megatron_wmss.training import trainer
    from megatron_wmss.training.recipe import load_recipe

    recipe = load_recipe("sft", str(REPO / "examples/recipes/tiny-sft.yaml"), [
        f"data.paths=[{REPO / 'examples/data/tiny_sft.jsonl'}]",
        f"tokenizer.path={REPO / 'examples/data/tiny_sp.model'}"], run_dir=str(workdir / "run"))
    _inject(data, "tokenize_sft", fail_rank, "in tokenization")
    trainer._tokenize(recipe)


def select(fail_rank: int, workdir: Path) -> None:
    """``wmss run``'s selection stage: rank 0 alone selects, the others wait for it."""
    import megatron_wmss.curriculum.select as selection
    from megatron_wmss.pipeline.stages import Stage, _run_select

    _inject(selection, "run_select", fail_rank, "in selection")
    _run_select(_pipeline_config(workdir), Stage(
        "seed1/select1", "select", {"weak": "shared/entropy_m0", "strong": "seed1/entropy_m1"},
        seed=1))


def evaluate(fail_rank: int, workdir: Path) -> None:
    """``wmss run``'s evaluation of an HF base: lm-eval on rank 0, the others wait."""
    import megatron_wmss.evaluation.runner as runner
    from megatron_wmss.pipeline.stages import Stage, _run_eval

    _inject(runner, "run_eval", fail_rank, "in evaluation")
    _run_eval(_pipeline_config(workdir), Stage("shared/eval_base", "eval", {"model": "base"},
                                               label="base"))


def save(fail_rank: int, workdir: Path) -> None:
    """A training checkpoint: every rank writes its shards, rank 0 the state and ``latest``.
    Rank 0 fails in its own part (the retention after publishing); another rank right after
    writing its shards, inside ``dist_checkpointing.save``, between megatron's collectives
    (its peers wait in one it never joins: the failure notice of torchrun/srun ranks, or the
    local launcher, ends them)."""
    from megatron.core import dist_checkpointing

    import megatron_wmss.training.state as state
    from tests.distributed.test_trainer_state import _setup

    setup = _setup(joint=False)
    if fail_rank == 0:
        _inject(state, "_retain", fail_rank, "in checkpoint retention")
    else:
        _inject(dist_checkpointing, "save", fail_rank, "after writing shards", after=True)
    state.save_training_checkpoint(setup, state.TrainState(step=1), workdir / "checkpoints",
                                   keep_last=1)


def busy_peer(fail_rank: int, workdir: Path) -> None:
    """A rank fails while its peers are blocked where they cannot see it go: a long piece of
    rank-local work here (loading a large checkpoint, rank 0's lm-eval), or an NCCL collective
    on a GPU node, which does not fail when a peer process exits."""
    import torch.distributed as dist

    if dist.get_rank() == fail_rank:
        time.sleep(1.0)
        raise RuntimeError(FAULT.format(where="while its peers were busy", rank=fail_rank))
    time.sleep(120.0)
    dist.barrier()


SCENARIOS = {"tokenize": tokenize, "select": select, "eval": evaluate, "save": save,
             "busy_peer": busy_peer}


def run_scenarios(cases: list[tuple[str, int]], workdir: str) -> list[tuple[object, float]]:
    """Harness entry: run each (scenario, failing rank) on this rank, one after the other
    (once a failure reached every rank they are in step again); per case what this rank ended
    with, (exception type, one-line message) or None, and the seconds it took."""
    from megatron_wmss.platform.errors import exception_message

    out = []
    for number, (name, fail_rank) in enumerate(cases):
        start = time.monotonic()
        try:
            SCENARIOS[name](fail_rank, Path(workdir) / f"{number}-{name}")
            outcome = None
        except Exception as exc:  # noqa: BLE001 - what each rank ended with is the result
            outcome = type(exc).__name__, exception_message(exc)
        finally:
            _restore()
        out.append((outcome, time.monotonic() - start))
    return out


def main(argv: list[str]) -> int:
    from megatron_wmss.platform.errors import run_command
    from megatron_wmss.platform.launch import distributed_from_env

    name, fail_rank, workdir = argv[0], int(argv[1]), Path(argv[2])

    def body() -> None:
        with distributed_from_env(1, 1):
            print(f"{READY} {time.time()}", file=sys.stderr, flush=True)
            SCENARIOS[name](fail_rank, workdir)

    return run_command(f"wmss {name}", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
