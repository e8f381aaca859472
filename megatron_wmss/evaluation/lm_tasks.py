"""Hooks the lm-eval task YAMLs in ``evaluation/tasks/`` name with ``!function``.

- ``load_<task>(**metadata)``: the ``custom_dataset`` of each task, a DatasetDict with split
  "test" from :func:`~megatron_wmss.evaluation.benchmarks.load_docs`. The directory comes from
  ``--metadata '{"data_dir": "DIR"}'`` (lm-eval passes the task's whole metadata as keyword
  arguments), else from the environment variable ``WMSS_EVAL_DATA_DIR``, else the hub.
- ``doc_to_text`` / ``doc_to_target`` per kind (the prompts of ``benchmarks.build_prompt``).
- :func:`keep_all`: a filter that keeps every repeat (lm-eval's default keeps the first only).
- ``process_<kind>(doc, results)``: ``{<primary metric>: first sample correct, "mean_correct":
  c / n, "n_correct": c}`` over the n repeats. Code is run by
  :func:`megatron_wmss.evaluation.code.check_completion`, which refuses unless
  ``WMSS_ALLOW_CODE_EXECUTION=1`` (``wmss eval --allow-code-execution`` sets it).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from megatron_wmss.evaluation import benchmarks

__all__ = ["DATA_DIR_ENV", "code_doc_to_target", "humaneval_doc_to_text", "keep_all",
           "load_aime24", "load_aime25", "load_amc23", "load_gsm8k", "load_local_math", "load_humaneval",
           "load_math500", "load_mbpp", "math_doc_to_target", "math_doc_to_text",
           "mbpp_doc_to_text", "process_humaneval", "process_math", "process_mbpp"]

DATA_DIR_ENV = "WMSS_EVAL_DATA_DIR"


def _dataset(name: str, metadata: dict[str, Any]):
    import datasets

    data_dir = metadata.get("data_dir") or os.environ.get(DATA_DIR_ENV) or None
    docs = benchmarks.load_docs(name, data_dir=data_dir)
    try:
        test = datasets.Dataset.from_list(docs)
    except Exception:  # noqa: BLE001 - a column of mixed types; keep the fields we grade on
        if benchmarks.get_task(name).kind != "math":
            raise
        test = datasets.Dataset.from_list(
            [{"question": d["question"], "answer": d["answer"]} for d in docs])
    return datasets.DatasetDict({"test": test})


def _loader(name: str) -> Callable[..., Any]:
    def load(**metadata):
        return _dataset(name, metadata)

    load.__name__ = load.__qualname__ = f"load_{name}"
    load.__doc__ = f"The {name} documents as lm-eval's custom_dataset (split 'test')."
    return load


load_aime24 = _loader("aime24")
load_aime25 = _loader("aime25")
load_amc23 = _loader("amc23")
load_math500 = _loader("math500")
load_gsm8k = _loader("gsm8k")
load_local_math = _loader("local_math")
load_humaneval = _loader("humaneval")
load_mbpp = _loader("mbpp")


def math_doc_to_text(doc: dict) -> str:
    return benchmarks.build_prompt("aime25", doc)  # every math task shares the prompt


def math_doc_to_target(doc: dict) -> str:
    return doc["answer"]


def humaneval_doc_to_text(doc: dict) -> str:
    return benchmarks.build_prompt("humaneval", doc)


def mbpp_doc_to_text(doc: dict) -> str:
    return benchmarks.build_prompt("mbpp", doc)


def code_doc_to_target(doc: dict) -> str:
    """The tests a completion must pass (logged as the target; grading runs them)."""
    if "entry_point" in doc:
        return f"{doc['test']}\ncheck({doc['entry_point']})"
    return "\n".join(doc["test_list"])


def keep_all(resps: list, docs: list) -> list:
    """Custom filter: every repeat of every document, unchanged."""
    return resps


def _completions(results: list) -> list[str]:
    """The responses of one document: ``[str]`` (take_first) or ``[[str, ...]]`` (keep_all)."""
    flat: list[str] = []
    for item in results:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return [str(text) for text in flat]


def _scores(metric: str, correct: list[bool]) -> dict[str, float]:
    n_correct = sum(correct)
    return {metric: float(correct[0]) if correct else 0.0,
            "mean_correct": n_correct / len(correct) if correct else 0.0,
            "n_correct": float(n_correct)}


def process_math(doc: dict, results: list) -> dict[str, float]:
    from megatron_wmss.evaluation.grading import grade_math

    return _scores("exact_match",
                   [grade_math(text, doc["answer"])[1] for text in _completions(results)])


def _process_code(task: str, doc: dict, results: list) -> dict[str, float]:
    from megatron_wmss.evaluation.code import check_completion, code_scored_here

    if not code_scored_here():  # a tensor-parallel rank whose scores are discarded
        return _scores("pass@1", [False for _ in _completions(results)])
    return _scores("pass@1", [check_completion(task, doc, text).passed
                              for text in _completions(results)])


def process_humaneval(doc: dict, results: list) -> dict[str, float]:
    return _process_code("humaneval", doc, results)


def process_mbpp(doc: dict, results: list) -> dict[str, float]:
    return _process_code("mbpp", doc, results)
