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
DATA = REPO / "examples" / "data" / "tiny_sft.jsonl"
TOKENIZER = REPO / "examples" / "data" / "tiny_sp.model"
FAULT = "injected fault {where} on rank {rank}"
READY = "fault_ranks: process group up at"
EXTRACTED = Path("run/seed1/extract")
"""The extract stage's directory under a scenario's workdir (its output: ``model``)."""


_UNDO: list = []


def _inject(module, name: str, fail_rank: int, where: str, *, after: bool = False) -> None:
    """Make ``module.name`` raise on rank ``fail_rank`` (after running when ``after``), until
    :func:`_restore`."""
    import torch.distributed as dist

    real = getattr(module, name)

    def faulty(*args, **kwargs):
        value = real(*args, **kwargs) if after else None
        if dist.get_rank() == fail_rank:
            raise RuntimeError(FAULT.format(where=where, rank=fail_rank))
        return value if after else real(*args, **kwargs)

    _stub(module, name, faulty)


def _stub(module, name: str, value) -> None:
    """Set ``module.name`` to ``value`` on this rank until :func:`_restore`."""
    real = getattr(module, name)
    _UNDO.append(lambda: setattr(module, name, real))
    setattr(module, name, value)


def _restore() -> None:
    while _UNDO:
        _UNDO.pop()()


def _pipeline_config(workdir: Path, training: dict | None = None):
    from megatron_wmss.pipeline.config import EvalSettings, PipelineConfig

    base = workdir / "base"  # an HF directory as far as the evaluation stage can tell
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}\n")
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / "local_math.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return PipelineConfig(run_dir=str(workdir / "run"), base=str(base),
                          training=training or {"data": {"paths": []}},
                          eval=EvalSettings(tasks=["local_math"], data_dir=str(workdir / "eval")))


def _tiny_data(workdir: Path, samples: int) -> Path:
    """The first ``samples`` conversations of the shipped data (written whole on every rank:
    a peer reading it meanwhile sees one complete copy or another)."""
    from megatron_wmss.platform.files import write_file_atomic

    workdir.mkdir(parents=True, exist_ok=True)
    lines = DATA.read_text().splitlines(keepends=True)[:samples]
    return write_file_atomic(workdir / "data.jsonl", "".join(lines))


def _tiny_checkpoint(out: Path, joint: bool = False) -> Path:
    """A one-layer model of the shipped tokenizer's vocabulary (two for ``joint``), written
    collectively with its model description as ``wmss import-hf`` writes one."""
    from megatron_wmss.config import ModelConfig
    from megatron_wmss.interop.convert import build_stage_model, save_with_metadata
    from megatron_wmss.interop.metadata import write_model_metadata
    from megatron_wmss.models import JointGPTModel

    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                      num_query_groups=2, vocab_size=320, max_position_embeddings=96,
                      params_dtype="float32")
    model = build_stage_model(cfg)
    if joint:
        model = JointGPTModel(model, build_stage_model(cfg))
    return save_with_metadata(model, out, False, "fixture",
                              lambda tmp: write_model_metadata(tmp, cfg))


def _joint_recipe(workdir: Path):
    """``wmss joint``'s tiny recipe: two steps on 16 conversations, a checkpoint after each."""
    from megatron_wmss.training.recipe import load_recipe

    return load_recipe("joint", str(REPO / "examples/recipes/tiny-joint.yaml"), [
        f"data.paths=[{_tiny_data(workdir, 16)}]", f"tokenizer.path={TOKENIZER}",
        "trainer.train_steps=2", "trainer.save_interval=1", "trainer.global_batch_size=4",
        "data.micro_batch_size=2"], run_dir=str(workdir / "run"))


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
    import megatron_wmss.pipeline.stages as stages
    from megatron_wmss.pipeline.stages import Stage, _run_eval

    # The hf backend whatever is installed (the base here is a config.json alone).
    _stub(stages, "eval_backend", lambda config: ("hf", "eval.backend"))
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


def _entropy_stage(workdir: Path):
    """(config, stage) of ``wmss run``'s entropy stage: a tiny model, 8 conversations."""
    from megatron_wmss.pipeline.stages import Stage

    config = _pipeline_config(workdir, {"data": {"paths": [str(_tiny_data(workdir, 8))],
                                                 "max_length": 96},
                                        "tokenizer": {"path": str(TOKENIZER)}})
    _tiny_checkpoint(config.root / "shared" / "m0")
    return config, Stage("shared/entropy_m0", "entropy", {"model": "shared/m0"})


def entropy(fail_rank: int, workdir: Path) -> None:
    """The entropy stage where ranks wait for each other: rank 0 tokenizes, then the other
    ranks read its cache (the last rank fails there); rank 0 alone writes each finished shard
    (and fails there)."""
    import megatron_wmss.curriculum.entropy as entropy_pass
    import megatron_wmss.data as data

    config, stage = _entropy_stage(workdir)
    if fail_rank == 0:
        _inject(entropy_pass, "write_file_atomic", fail_rank, "in writing an entropy shard")
    else:
        _inject(data, "tokenize_sft", fail_rank, "in reading the tokenized data")
    _run_stage(config, stage)


def entropy_forward(fail_rank: int, workdir: Path) -> None:
    """The entropy stage with a rank failing in its share of the forward passes, while its
    peers go on to gather the shard's entropies (a collective it never joins)."""
    import megatron_wmss.curriculum.entropy as entropy_pass

    config, stage = _entropy_stage(workdir)
    _inject(entropy_pass, "_run_shard", fail_rank, "in its entropy forward passes")
    _run_stage(config, stage)


def joint(fail_rank: int, workdir: Path) -> None:
    """``wmss joint``: rank 0 alone writes the model description into the first checkpoint
    while its peers wait for it."""
    import megatron_wmss.interop.metadata as metadata
    from megatron_wmss.training.trainer import run_training

    _inject(metadata, "write_model_metadata", fail_rank, "in writing the model description")
    run_training(_joint_recipe(workdir))


def joint_step(fail_rank: int, workdir: Path) -> None:
    """``wmss joint`` with a rank failing in the forward pass of the strong and weak models,
    while its peers go on to reduce the step's gradients and loss (collectives it never
    joins)."""
    from megatron_wmss.models import JointGPTModel
    from megatron_wmss.training.trainer import run_training

    _inject(JointGPTModel, "forward", fail_rank, "in the joint forward pass")
    run_training(_joint_recipe(workdir))


def extract(fail_rank: int, workdir: Path) -> None:
    """``wmss run``'s extraction of the strong model: rank 0 alone writes the model
    description into it, after megatron's save, while its peers wait for it."""
    import megatron_wmss.interop.convert as convert

    config, stage = _extract_stage(workdir)
    _inject(convert, "copy_model_metadata", fail_rank, "in writing the model description")
    _run_stage(config, stage)


def extract_save(fail_rank: int, workdir: Path) -> None:
    """The extraction failing inside megatron's save, between its collectives: rank 0 writing
    metadata.json alone (its peers wait at the barrier after it), or another rank before it
    wrote its shards (its peers plan the save with it)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    config, stage = _extract_stage(workdir)
    if fail_rank == 0:
        _inject(serialization, "save_config", fail_rank, "in writing metadata.json")
    else:
        _inject(TorchDistSaveShardedStrategy, "async_save", fail_rank,
                "before writing its shards")
    _run_stage(config, stage)


def _extract_stage(workdir: Path):
    """(config, stage) of ``wmss run``'s extract stage, its tiny joint checkpoint written."""
    from megatron_wmss.pipeline.stages import Stage

    config = _pipeline_config(workdir)
    _tiny_checkpoint(config.root / "seed1" / "joint", joint=True)
    return config, Stage("seed1/extract", "extract", {"joint": "seed1/joint"}, seed=1)


def _run_stage(config, stage) -> None:
    from megatron_wmss.pipeline.stages import _RUNNERS

    _RUNNERS[stage.kind](config, stage)


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
             "busy_peer": busy_peer, "entropy": entropy, "entropy_forward": entropy_forward,
             "joint": joint, "joint_step": joint_step, "extract": extract,
             "extract_save": extract_save}


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
