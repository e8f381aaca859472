"""Code benchmarks (HumanEval, MBPP): the program a completion makes, run in the sandbox.

Code runs only after an explicit opt-in: ``wmss eval --allow-code-execution`` (or ``wmss eval
score --allow-code-execution``) sets ``WMSS_ALLOW_CODE_EXECUTION=1`` for the run, and
:func:`check_completion` refuses without it, so an lm-eval run started some other way cannot
execute model output by accident. Every program runs in the sandbox (:mod:`.sandbox`), graded
by :mod:`.code_harness`: only a complete run of the benchmark's tests passes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_wmss.evaluation.sandbox import (ISOLATION_MODES, SANDBOX_ENV, IsolationUnavailable,
                                              SandboxLimits, require_isolation, run_sandboxed)
from megatron_wmss.platform.errors import UserError

__all__ = ["ALLOW_CODE_ENV", "CODE_TASKS", "add_sandbox_argument", "DISCARD_SCORES_ENV", "CodeResult", "grading_job",
           "check_completion", "code_scored_here",
           "code_execution_allowed", "extract_code", "reference_completion",
           "require_code_execution", "require_sandbox"]

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


def add_sandbox_argument(parser) -> None:
    """``--sandbox {bwrap,rlimits}`` for the commands that run code tasks."""
    parser.add_argument("--sandbox", choices=ISOLATION_MODES, default="bwrap",
                        help="isolation of model-written code: bwrap (default: bubblewrap "
                        "namespaces without network, a read-only filesystem and a size-capped "
                        "scratch; refused where it cannot be set up) or rlimits (resource "
                        "limits only: an explicit opt-in to weaker isolation)")


def require_sandbox(mode: Optional[str] = None) -> str:
    """The sandbox mode for code tasks (``mode``, else ``$WMSS_SANDBOX``, else bwrap), checked
    to work on this machine and exported to ``$WMSS_SANDBOX`` for lm-eval's scoring hooks;
    UserError (one line: what is missing, how to opt into rlimits) where it does not."""
    try:
        mode = require_isolation(mode)
    except (IsolationUnavailable, ValueError) as err:
        raise UserError(str(err)) from None
    os.environ[SANDBOX_ENV] = mode
    return mode


def extract_code(completion: str) -> str:
    """The first fenced code block of ``completion`` (an unclosed one runs to the end), else
    the completion itself (a raw continuation of the prompt)."""
    match = _FENCE_RE.search(completion)
    return match.group(1) if match else completion


def _check_task(task: str) -> None:
    if task not in CODE_TASKS:
        raise UserError(f"{task!r} is not a code task; code tasks: {', '.join(CODE_TASKS)}")


def _program(task: str, doc: dict, completion: str) -> str:
    """The model's program: HumanEval's prompt followed by the completion (a completion that
    defines ``def <entry_point>``, a chat model answering with the whole function, follows a
    stub of the prompt's function, so it may use the prompt's imports and helpers; otherwise
    it continues the prompt's function body); MBPP's code as it is."""
    code = extract_code(completion)
    if task == "mbpp":
        return code
    entry = doc["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        return doc["prompt"] + "\n    pass\n\n" + code
    return doc["prompt"] + code


def grading_job(task: str, doc: dict, completion: str) -> dict:
    """What :mod:`.code_harness` runs: the model's program, and the benchmark's own setup and
    tests, which run in the grader against the program's objects.

    HumanEval: the prompt (its imports and helpers, which tests such as ``decode_cyclic``'s
    call) is the setup, the entry point comes from the program, the tests are the problem's
    ``check`` called on it. MBPP: the setup code, then the asserts; the functions and classes
    they name come from the program.
    """
    _check_task(task)
    if task == "humaneval":
        entry = doc["entry_point"]
        return {"program": _program(task, doc, completion), "setup": doc["prompt"],
                "names": [entry], "test": f"{doc['test']}\n\ncheck({entry})\n"}
    return {"program": _program(task, doc, completion),
            "setup": doc.get("test_setup_code") or "", "names": [],
            "test": "\n".join(doc["test_list"]) + "\n"}


@dataclass(frozen=True)
class CodeResult:
    """How one completion fared against its benchmark's tests."""

    status: str
    """"passed" (every test ran and held), "failed" (a test's assert failed), "error" (the
    program or the tests raised), "exited" (the program ended before the tests were done with
    it), "timeout" (wall clock or CPU), "limit" (memory, or a malformed grader run)."""
    reason: str
    """Why, in a few words ("tests failed", "exited early", "wall clock", ...)."""
    detail: str
    """The failing test line, exception or how the program ended, and its output's tail."""
    isolation: str
    """The sandbox mode it ran under ("bwrap" or "rlimits")."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    return Path(__file__).with_name("code_harness.py").read_text()


def check_completion(task: str, doc: dict, completion: str,
                     limits: Optional[SandboxLimits] = None,
                     mode: Optional[str] = None) -> CodeResult:
    """Grade ``completion`` on ``doc`` in the sandbox (opt-in required): passed only when the
    benchmark's tests ran to completion against it (:mod:`.code_harness`). Never raises for
    what the program does; IsolationUnavailable where the sandbox cannot isolate."""
    require_code_execution(task)
    nonce = secrets.token_hex(16)
    job = dict(grading_job(task, doc, completion), nonce=nonce)
    run = run_sandboxed("harness.py", {"harness.py": _harness_source()},
                        stdin=json.dumps(job).encode(), limits=limits, mode=mode,
                        interpreter_flags=("-I", "-S"))
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(nonce + " "):
            try:  # a process the program left could have written into the line
                verdict = json.loads(line[len(nonce) + 1:])
                return CodeResult(str(verdict["status"]), str(verdict["reason"]),
                                  str(verdict["detail"]), run.isolation)
            except (ValueError, TypeError, KeyError):
                return CodeResult("error", "malformed verdict", line[-500:], run.isolation)
    why = "; ".join(run.notes) or f"the grader ended with status {run.returncode}"
    tail = run.stderr.strip()[-1500:]
    if run.timed_out:
        return CodeResult("timeout", "wall clock" if run.returncode is None else "cpu limit",
                          why, run.isolation)
    return CodeResult("exited", "the grader ended without a verdict",
                      why + (f"\n{tail}" if tail else ""), run.isolation)


def reference_completion(task: str, doc: dict) -> str:
    """The benchmark's own solution, as a completion (HumanEval's body, MBPP's code)."""
    _check_task(task)
    return doc["canonical_solution"] if task == "humaneval" else doc["code"]
