"""Code benchmarks (HumanEval, MBPP): the program a completion makes, run in the sandbox.

Code runs only after an explicit opt-in: ``wmss eval --allow-code-execution`` (or ``wmss eval
score --allow-code-execution``) sets ``WMSS_ALLOW_CODE_EXECUTION=1`` for the run, and
:func:`check_completion` refuses without it, so an lm-eval run started some other way cannot
execute model output by accident. Every program runs in :func:`sandbox.run_python`.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from megatron_wmss.evaluation.sandbox import SandboxLimits, SandboxResult, run_python
from megatron_wmss.platform.errors import UserError

__all__ = ["ALLOW_CODE_ENV", "CODE_TASKS", "DISCARD_SCORES_ENV", "build_program",
           "check_completion", "code_scored_here",
           "code_execution_allowed", "extract_code", "reference_completion",
           "require_code_execution"]

ALLOW_CODE_ENV = "WMSS_ALLOW_CODE_EXECUTION"
DISCARD_SCORES_ENV = "WMSS_EVAL_DISCARDS_SCORES"  # set on ranks whose results are not written
CODE_TASKS = ("humaneval", "mbpp")
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.I)


def code_execution_allowed() -> bool:
    return os.environ.get(ALLOW_CODE_ENV) == "1"


def code_scored_here() -> bool:
    """False on a rank that evaluates only to keep its tensor-parallel peers company: running
    every program once per rank would cost CPU and change nothing."""
    return os.environ.get(DISCARD_SCORES_ENV) != "1"


def require_code_execution(task: str) -> None:
    if not code_execution_allowed():
        raise UserError(f"{task} executes model-written code; pass --allow-code-execution to "
                        f"run it in the sandbox (or set {ALLOW_CODE_ENV}=1)")


def extract_code(completion: str) -> str:
    """The first fenced code block of ``completion`` (an unclosed one runs to the end), else
    the completion itself (a raw continuation of the prompt)."""
    match = _FENCE_RE.search(completion)
    return match.group(1) if match else completion


def _check_task(task: str) -> None:
    if task not in CODE_TASKS:
        raise UserError(f"{task!r} is not a code task; code tasks: {', '.join(CODE_TASKS)}")


def build_program(task: str, doc: dict, completion: str) -> str:
    """The whole program whose exit status grades ``completion`` on ``doc``.

    HumanEval: a completion that defines ``def <entry_point>`` (a chat model answering with
    the whole function) follows the prompt, whose imports and helpers it may use; otherwise it
    continues the prompt's function body. Then the problem's tests and ``check(<entry_point>)``.
    MBPP: the code, the problem's setup code and its asserts.
    """
    _check_task(task)
    code = extract_code(completion)
    if task == "humaneval":
        entry = doc["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
            body = doc["prompt"] + "\n    pass\n\n" + code
        else:
            body = doc["prompt"] + code
        return f"{body}\n\n{doc['test']}\n\ncheck({entry})\n"
    tests = "\n".join(doc["test_list"])
    return f"{code}\n\n{doc.get('test_setup_code') or ''}\n\n{tests}\n"


def check_completion(task: str, doc: dict, completion: str,
                     limits: Optional[SandboxLimits] = None) -> SandboxResult:
    """Run ``completion``'s program in the sandbox (opt-in required); never raises for what
    the program does."""
    require_code_execution(task)
    return run_python(build_program(task, doc, completion), limits)


def reference_completion(task: str, doc: dict) -> str:
    """The benchmark's own solution, as a completion (HumanEval's body, MBPP's code)."""
    _check_task(task)
    return doc["canonical_solution"] if task == "humaneval" else doc["code"]
