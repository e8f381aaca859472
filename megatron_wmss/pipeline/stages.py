"""The stages of ``wmss run`` and how each one runs on every rank.

A stage has an id (``seed1/joint``, ``shared/entropy_m0``), a kind (sft, joint, entropy,
select, extract, eval), a directory ``RUN_DIR/<id>`` and a completion marker
``RUN_DIR/stages/<id>.json`` written by rank 0, atomically, once the stage is complete on every
rank. A rerun skips marked stages; an unmarked one starts again and resumes what it left (the
trainer from its last checkpoint, the entropy pass from its finished shards; selection,
extraction and evaluation are redone whole). Each stage seeds torch, numpy and random from
its run's seed before it starts, so a stage run after a kill computes what it would have
computed in one go.

Round t of K (WMSS.md §5): entropies of M_{t-1} and M_t → selection → joint training with
strong M_t, weak M_{t-1} → extraction of M_{t+1}. M0 is the base, M1 phase 1's SFT model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_wmss.pipeline.config import PipelineConfig
from megatron_wmss.platform.peak_memory import PeakMemory
from megatron_wmss.platform.ranks import on_rank_zero

__all__ = ["PREEMPTED", "Stage", "model_path", "plan_stages", "run_stages"]

PREEMPTED = 75  # the trainer's preemption exit code (training.signals)


@dataclass
class Stage:
    id: str
    kind: str
    """sft | joint | entropy | select | extract | eval"""
    params: dict = field(default_factory=dict)
    seed: int = 0
    label: str = ""
    """Row of the report for eval stages (base, sft_1epoch, sft_baseline, wmss, <control>)."""

    def directory(self, root: Path) -> Path:
        return root / self.id

    def marker(self, root: Path) -> Path:
        return root / "stages" / f"{self.id}.json"


def _merge(base: dict, *updates: dict) -> dict:
    out = copy.deepcopy(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def plan_stages(config: PipelineConfig) -> list[Stage]:
    """Every stage of the run, in the order they run (dependencies first)."""
    K = config.iterations
    stages: list[Stage] = [Stage("shared/entropy_m0", "entropy", {"model": "base"})]
    for seed in config.seeds:
        s = f"seed{seed}"
        add = lambda id_, kind, label="", **params: stages.append(  # noqa: E731
            Stage(f"{s}/{id_}", kind, params, seed, label))
        add("sft", "sft", init="base", epochs=1)                          # M1
        models = {0: "base", 1: f"{s}/sft"}
        entropies = {0: "shared/entropy_m0"}
        for t in range(1, K + 1):
            entropies[t] = f"{s}/entropy_m{t}"
            add(f"entropy_m{t}", "entropy", model=models[t])
            add(f"select{t}", "select", weak=entropies[t - 1], strong=entropies[t])
            add(f"joint{t}", "joint", strong=models[t], weak=models[t - 1],
                active_set=f"{s}/select{t}")
            add(f"extract{t}", "extract", joint=f"{s}/joint{t}")
            models[t + 1] = f"{s}/extract{t}"
        add("baseline", "sft", init="base", epochs=1 + K)
        for control in config.controls:
            if control == "temperature":
                lam = (config.joint.get("mix") or {}).get("mix_lambda", 0.5)
                add(control, "sft", init=models[1], epochs=1, active_set=f"{s}/select1",
                    loss={"logit_scale": lam})
            elif control == "wdds_only":
                add(control, "sft", init=models[1], epochs=1, active_set=f"{s}/select1")
            elif control == "sft_fresh_optimizer":
                add(control, "sft", init=models[1], epochs=1)
            elif control == "label_smoothing":
                add(control, "sft", init="base", epochs=1 + K,
                    loss={"label_smoothing": config.label_smoothing})
            elif control == "wdjt_only":
                add(control, "joint", strong=models[1], weak="base")
                add(f"{control}_extract", "extract", joint=f"{s}/{control}")
            elif control == "frozen_weak":
                add(control, "joint", strong=models[1], weak="base",
                    active_set=f"{s}/select1", mix={"freeze_weak": True})
                add(f"{control}_extract", "extract", joint=f"{s}/{control}")
        if seed == config.seeds[0]:  # evaluations after training: no lm-eval before then
            stages.append(Stage("shared/eval_base", "eval", {"model": "base"}, label="base"))
        add("eval_sft", "eval", "sft_1epoch", model=f"{s}/sft")
        add("eval_baseline", "eval", "sft_baseline", model=f"{s}/baseline")
        add("eval_wmss", "eval", "wmss", model=models[K + 1])
        for control in config.controls:
            trained = f"{s}/{control}_extract" if control in ("wdjt_only", "frozen_weak") \
                else f"{s}/{control}"
            add(f"eval_{control}", "eval", control, model=trained)
    return stages


def model_path(config: PipelineConfig, ref: str) -> str:
    """The model a stage reference names: the base, a training stage's newest complete
    checkpoint, or an extraction's output."""
    from megatron_wmss.training.state import find_resume_checkpoint

    path = Path(config.base) if ref == "base" else config.root / ref
    if ref != "base" and (path / "model").is_dir():
        return str(path / "model")
    for candidate in (path, path / "checkpoints"):
        if (candidate / "metadata.json").is_file() or (candidate / "config.json").is_file():
            return str(candidate)
        if (candidate / "latest").is_file():
            found = find_resume_checkpoint(candidate)
            if found is not None:
                return str(found)
    raise FileNotFoundError(f"no model in {path} (stage {ref} did not finish?)")


# --- running --------------------------------------------------------------------------------

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _layout(tp: int, pp: int):
    """megatron's parallel state at ``tp`` x ``pp`` for one stage (the process group stays)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    yield


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _recipe(config: PipelineConfig, stage: Stage):
    from megatron_wmss.training.recipe import build_recipe

    p, kind = stage.params, stage.kind
    fixed: dict = {"trainer": {"epochs": p["epochs"] if "epochs" in p else 1,
                               "seed": stage.seed, "run_dir": str(stage.directory(config.root))},
                   "data": {"seed": stage.seed,
                            "active_set": (str(config.root / p["active_set"] / "active_set.jsonl")
                                           if p.get("active_set") else None)}}
    if kind == "sft":
        fixed["init"] = {"model": model_path(config, p["init"])}
        if p.get("loss"):
            fixed["loss"] = p["loss"]
        raw = _merge(config.training, config.sft, fixed)
    else:
        fixed["init"] = {"strong": model_path(config, p["strong"]),
                         "weak": model_path(config, p["weak"])}
        if p.get("mix"):
            fixed["mix"] = p["mix"]
        raw = _merge(config.training, config.joint, fixed)
    # An init checkpoint carries the architecture; the shared section may still restate it.
    return build_recipe(kind, raw)


def _tokenizer_path(config: PipelineConfig) -> Optional[str]:
    return (config.training.get("tokenizer") or {}).get("path")


def _run_training(config: PipelineConfig, stage: Stage) -> dict:
    from megatron_wmss.training.trainer import run_training

    recipe = _recipe(config, stage)
    with _layout(recipe.parallel.tensor_model_parallel_size,
                 recipe.parallel.pipeline_model_parallel_size):
        code = run_training(recipe)
    if code != 0:
        raise _StageStopped(code)
    return {"checkpoint": model_path(config, stage.id),
            "metrics": str(stage.directory(config.root) / "metrics.jsonl")}


def _run_entropy(config: PipelineConfig, stage: Stage) -> dict:
    from megatron_wmss.config.recipe import build_dataclass
    from megatron_wmss.curriculum.entropy import EntropyJob, compute_entropies
    from megatron_wmss.data.config import DataConfig, TokenizerConfig

    data = _merge(config.training["data"], {"micro_batch_size": config.entropy.micro_batch_size,
                                           "shuffle": False, "active_set": None})
    out = stage.directory(config.root) / "entropy.jsonl"
    tokenizer = _tokenizer_path(config)
    job = EntropyJob(model=model_path(config, stage.params["model"]),
                     data=build_dataclass(DataConfig, data, "training.data"), out=str(out),
                     tokenizer=TokenizerConfig(path=tokenizer) if tokenizer else None,
                     shard_size=config.entropy.shard_size,
                     positions=config.entropy.positions)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _layout(config.entropy.tensor_model_parallel_size,
                 config.entropy.pipeline_model_parallel_size):
        compute_entropies(job)
    return {"entropies": str(out)}


def _run_select(config: PipelineConfig, stage: Stage) -> dict:
    from megatron_wmss.curriculum.select import SelectionConfig, run_select

    out = stage.directory(config.root)
    entropy = lambda ref: str(config.root / ref / "entropy.jsonl")  # noqa: E731
    summary = on_rank_zero(
        lambda: run_select(entropy(stage.params["weak"]), entropy(stage.params["strong"]), out,
                           SelectionConfig(**config.selection, seed=stage.seed),
                           overwrite=True), f"{stage.id}: selection")
    return {"active_set": str(out / "active_set.jsonl"),
            "unique_kept": summary["unique_kept"], "fraction_kept": summary["fraction_kept"]}


def _run_extract(config: PipelineConfig, stage: Stage) -> dict:
    from megatron_wmss.interop.convert import extract_megatron

    out = stage.directory(config.root) / "model"
    joint = model_path(config, stage.params["joint"])
    with _layout(*_saved_layout(joint)):
        extract_megatron(joint, out, which="strong", overwrite=True)
    _barrier()
    return {"model": str(out)}


def _saved_layout(checkpoint: str) -> tuple[int, int]:
    """(TP, PP) a training checkpoint was saved at (its train_state.json), where this world
    can run it; else (1, 1). Extraction runs there: no rank holds more than its training shard,
    and the evaluations and later rounds, at that layout too, load it without resharding (a
    load at another TP reads whole stored tensors)."""
    import torch.distributed as dist

    try:
        tp, pp, _ = json.loads((Path(checkpoint) / "train_state.json").read_text())["layout"]
        tp, pp = int(tp), int(pp)
    except (OSError, KeyError, TypeError, ValueError):
        return 1, 1
    world = dist.get_world_size() if dist.is_initialized() else 1
    return (tp, pp) if tp >= 1 and pp >= 1 and world % (tp * pp) == 0 else (1, 1)


def _base_tokenizer_and_head_dim(config: PipelineConfig) -> tuple[Optional[str], int]:
    """The run's tokenizer (a path, None when unknown) and its models' head_dim, from the
    config and the base model M0 (every model of a run shares both)."""
    from megatron_wmss.evaluation.runner import model_kind
    from megatron_wmss.interop import read_model_metadata

    base = model_path(config, "base")
    if model_kind(base) == "hf":
        hf = json.loads((Path(base) / "config.json").read_text())
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return _tokenizer_path(config) or base, int(head_dim)
    meta = read_model_metadata(base)
    tokenizer = _tokenizer_path(config) or (str(meta.tokenizer_dir) if meta.tokenizer_dir
                                           else None)
    return tokenizer, int(meta.model.head_dim)


def eval_backend(config: PipelineConfig) -> tuple[str, str]:
    """The backend that scores every model of the run, and why (the report says both)."""
    from megatron_wmss.evaluation.vllm_support import vllm_distribution, why_vllm_cannot_serve

    wanted = config.eval.backend
    if wanted == "megatron":
        return wanted, "eval.backend"
    if wanted == "auto" and vllm_distribution() is None:
        return "megatron", "eval.backend auto: vLLM is not installed"
    reason = why_vllm_cannot_serve(*_base_tokenizer_and_head_dim(config),
                                   tokenizer_only=wanted == "hf")
    if reason and wanted != "auto":
        raise ValueError(f"eval.backend {wanted}: {reason}; use eval.backend megatron")
    if reason:
        return "megatron", f"eval.backend auto: {reason}"
    if wanted == "auto":
        return "vllm", "eval.backend auto: vLLM installed"
    return wanted, "eval.backend"


def _run_eval(config: PipelineConfig, stage: Stage) -> dict:
    """Score one model with the run's backend: megatron in process on every rank (an HF base
    imported first), or hf / vllm on rank 0 (a checkpoint exported first)."""
    from megatron_wmss.evaluation.runner import (
        EvalJob,
        check_job,
        evaluate_rank,
        model_kind,
        run_eval,
    )
    from megatron_wmss.interop import export_hf, import_hf

    settings = config.eval
    backend, why = eval_backend(config)
    model = model_path(config, stage.params["model"])
    directory = stage.directory(config.root)
    megatron = backend == "megatron"
    if megatron and model_kind(model) == "hf":
        with _layout(1, 1):
            import_hf(model, directory / "megatron", overwrite=True)
        model = str(directory / "megatron")
    elif not megatron and model_kind(model) == "megatron":
        with _layout(1, 1):
            export_hf(model, directory / "hf", overwrite=True)
        model = str(directory / "hf")
    _barrier()
    job = EvalJob(model=model, tasks=list(settings.tasks), out=str(directory / "eval"),
                  backend=backend, data_dir=settings.data_dir,
                  limit=settings.limit, max_new_tokens=settings.max_new_tokens,
                  tp=settings.tensor_model_parallel_size if megatron else 1,
                  tokenizer=_tokenizer_path(config) if megatron else None,
                  batch_size=settings.batch_size,
                  generate_batch_size=settings.generate_batch_size if megatron else None,
                  seed=settings.seed, label=stage.label, overwrite=True)
    job = check_job(job)
    if megatron:
        with _layout(settings.tensor_model_parallel_size, 1):
            summary = evaluate_rank(job)
    else:  # lm-eval's own model classes, on rank 0
        summary = on_rank_zero(lambda: run_eval(job), f"{stage.id}: evaluation", share=False)
    if summary is None:
        return {}
    return {"model": model, "label": stage.label, "backend": backend, "backend_reason": why,
            "scores": {task: v["score"] for task, v in summary["tasks"].items()},
            "n": {task: v["n"] for task, v in summary["tasks"].items()}}


_RUNNERS = {"sft": _run_training, "joint": _run_training, "entropy": _run_entropy,
            "select": _run_select, "extract": _run_extract, "eval": _run_eval}


class _StageStopped(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def read_marker(config: PipelineConfig, stage: Stage) -> Optional[dict]:
    path = stage.marker(config.root)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_stages(config: PipelineConfig, stages: list[Stage]) -> int:
    """Run every unmarked stage on this rank (all ranks call it); 0 when all are done, the
    trainer's code (75: preempted, 3: non-finite) when a training stage stopped early."""
    _preload()
    for number, stage in enumerate(stages, 1):
        where = f"wmss run: [{number}/{len(stages)}] {stage.id} ({stage.kind})"
        if read_marker(config, stage) is not None:
            if _rank() == 0:
                print(f"{where}: done, skipped", file=sys.stderr, flush=True)
            continue
        if _rank() == 0:
            print(f"{where}", file=sys.stderr, flush=True)
        _seed_everything(stage.seed)
        stage.directory(config.root).mkdir(parents=True, exist_ok=True)
        peak = PeakMemory()
        peak.start()
        started = time.monotonic()
        try:
            result = _RUNNERS[stage.kind](config, stage)
        except _StageStopped as stop:
            return stop.code
        cost = {"seconds": time.monotonic() - started, "tokens": _tokens(config, stage, result)}
        # A rank that failed inside the stage is past announcing it here (its peers may sit in
        # a collective of the stage): the launcher ends them (platform/ranks.py).
        cost.update(_peaks(peak.stop()))
        on_rank_zero(lambda: _write_marker(config, stage, result, cost), f"{stage.id}: marker")
    return 0


def _preload() -> None:
    """Import the libraries the stages use before the first one starts, so that their one-time
    loading (~0.1 GiB of code and tables) is not counted in that stage's peak memory."""
    import importlib
    import importlib.util

    for name in ("datasets", "transformers", "lm_eval"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _peaks(mine: Optional[dict]) -> dict:
    """Every rank's peak memory of the stage (collective: also the stage's end barrier):
    ``peak_bytes`` per rank and how it was measured, or nothing where no rank measured."""
    import torch.distributed as dist

    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    if any(p is None for p in every):
        return {}
    return {"peak_bytes": [p["bytes"] for p in every], "peak_measure": every[0]["how"]}


def _tokens(config: PipelineConfig, stage: Stage, result: dict) -> Optional[int]:
    """Tokens the stage put through its model(s): every real token of every training step
    (the last log of each step), of every entropy row; None for the other kinds."""
    if stage.kind in ("sft", "joint"):
        path = stage.directory(config.root) / "metrics.jsonl"
        by_step = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            record = json.loads(line)
            if "tokens" in record and "step" in record:
                by_step[record["step"]] = record["tokens"]
        return int(sum(by_step.values()))
    if stage.kind == "entropy":
        meta = Path(result["entropies"] + ".meta.json")
        return json.loads(meta.read_text()).get("tokens") if meta.is_file() else None
    return None


def _write_marker(config: PipelineConfig, stage: Stage, result: dict, cost: dict) -> None:
    from megatron_wmss.platform.files import write_file_atomic

    marker = stage.marker(config.root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(marker, json.dumps({"stage": stage.id, "kind": stage.kind,
                                          "seed": stage.seed, "label": stage.label,
                                          "params": stage.params, "result": result,
                                          "cost": cost},
                                         indent=2) + "\n")
