"""The sandbox for model-written code: hostile programs end as failures within their limits,
leave nothing behind, and the evaluator (this process) carries on."""

from __future__ import annotations

import glob
import os
import tempfile
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_wmss.evaluation.code import extract_code
from megatron_wmss.evaluation.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=512, max_processes=16, max_file_mb=4)
# The caller's backstop is timeout_s + 15 s; a run must end well before it.
DEADLINE_S = LIMITS.timeout_s + 3.0


def _timed(source: str, limits: SandboxLimits = LIMITS):
    start = time.monotonic()
    result = run_python(textwrap.dedent(source), limits)
    return result, time.monotonic() - start


def test_a_well_behaved_program_passes_and_leaves_nothing_behind():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "wmss-sandbox-*")))
    result, _ = _timed("import os, sys\nprint(os.getcwd())\nprint('hello', file=sys.stdout)\n")
    assert result.passed and result.returncode == 0, result
    assert result.detail.split() == ["/tmp", "hello"] and result.isolation == "bwrap"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "wmss-sandbox-*"))) <= before


def test_a_failing_assert_is_a_failure_with_its_traceback():
    result, _ = _timed("assert 1 + 1 == 3, 'arithmetic'\n")
    assert result.status == "failed" and result.returncode == 1
    assert "AssertionError: arithmetic" in result.detail


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    result, elapsed = _timed("while True:\n    pass\n")
    assert not result.passed and result.status == "timeout", result
    assert "cpu_s=2" in result.detail
    assert elapsed < DEADLINE_S, elapsed


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    result, elapsed = _timed("import time\ntime.sleep(60)\n")
    assert not result.passed and result.status == "timeout"
    assert "timeout_s=4.0" in result.detail
    assert LIMITS.timeout_s - 0.5 < elapsed < DEADLINE_S, elapsed


def test_a_fork_bomb_fails_and_leaves_no_process_behind():
    before = _sandbox_processes()
    result, elapsed = _timed("""
        import os
        while True:
            os.fork()
    """)
    assert not result.passed, result
    assert elapsed < DEADLINE_S, elapsed
    time.sleep(0.2)
    assert _sandbox_processes() <= before


def _sandbox_processes() -> set[int]:
    """Processes of the sandbox's uid pool (only used as root)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid >= 0x70000000:
                found.add(int(pid))
        except OSError:
            pass
    return found


def test_a_10_gb_allocation_fails_with_memory_error():
    result, elapsed = _timed("block = bytearray(10 * 1024 ** 3)\nprint(len(block))\n")
    assert result.status == "failed" and "MemoryError" in result.detail, result
    assert elapsed < DEADLINE_S


def test_writing_a_huge_file_fails_at_the_file_size_limit():
    result, elapsed = _timed("""
        with open("big.bin", "wb") as f:
            for _ in range(1024):   # 1 GiB, 1 MiB at a time
                f.write(b"x" * 1024 * 1024)
    """)
    assert result.status == "failed", result
    assert "File too large" in result.detail or "SIGXFSZ" in result.detail, result.detail
    assert elapsed < DEADLINE_S


def test_flooding_stdout_is_truncated_not_buffered_in_the_evaluator():
    result, elapsed = _timed("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n")
    assert not result.passed
    assert f"output truncated at max_file_mb={LIMITS.max_file_mb}" in result.detail
    assert len(result.detail) < 4000 and elapsed < DEADLINE_S


def test_concurrent_sandboxes_in_several_processes_do_not_interfere():
    """Threads here and a second evaluator process at once (as tensor-parallel ranks do): each
    program finds its own files, and none loses its scratch directory to another."""
    program = ("import os, time\nopen('mine', 'w').write(str(os.getpid()))\ntime.sleep(0.3)\n"
               "assert open('mine').read() == str(os.getpid())\n")
    other = subprocess.Popen(
        [sys.executable, "-c", "from concurrent.futures import ThreadPoolExecutor\n"
         "from megatron_wmss.evaluation.sandbox import run_python\n"
         f"with ThreadPoolExecutor(4) as pool:\n"
         f"    results = list(pool.map(run_python, [{program!r}] * 8))\n"
         "assert all(r.passed for r in results), results\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_python, [program] * 8))
    _, err = other.communicate(timeout=120)
    assert all(r.passed for r in results), results
    assert other.returncode == 0, err[-2000:]
    assert threading.active_count() >= 1  # the evaluator is still here


def test_limits_are_validated():
    with pytest.raises(ValueError, match="SandboxLimits.memory_mb must be a number >= 64"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ValueError, match="SandboxLimits.cpu_s must be an integer"):
        SandboxLimits(cpu_s=1.5)


@pytest.mark.parametrize("completion, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\ny = 2\n```\n```python\nz = 3\n```", "y = 2\n"),
    ("```python\nunclosed = True\n", "unclosed = True\n"),
    ("    return a + b\n", "    return a + b\n"),  # a raw continuation of the prompt
])
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


