"""The sandbox for model-written code: hostile programs end as failures within their limits,
leave nothing behind, and the evaluator (this process) carries on."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_wmss.evaluation.code import build_program, extract_code
from megatron_wmss.evaluation.sandbox import SandboxLimits, probe_isolation, run_python

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=512, max_processes=16, max_file_mb=4)
# The caller's backstop is timeout_s + 15 s; a run must end well before it.
DEADLINE_S = LIMITS.timeout_s + 3.0


def _timed(source: str, limits: SandboxLimits = LIMITS):
    start = time.monotonic()
    result = run_python(textwrap.dedent(source), limits)
    return result, time.monotonic() - start


def _scratch_of(result) -> str:
    """The directory the program ran in (from its printed cwd or its traceback)."""
    return re.search(r"(/\S*?wmss-sandbox-[^/\s\"]+)", result.detail).group(1)


def test_a_well_behaved_program_passes_and_its_scratch_directory_is_removed():
    result, _ = _timed("import os, sys\nprint(os.getcwd())\nprint('hello', file=sys.stdout)\n")
    assert result.passed and result.returncode == 0, result
    assert "hello" in result.detail
    assert "rlimits" in result.isolation
    scratch = _scratch_of(result)
    assert "wmss-sandbox-" in scratch and not os.path.exists(scratch)


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
    assert not os.path.exists(_scratch_of(result))


def test_flooding_stdout_is_truncated_not_buffered_in_the_evaluator():
    result, elapsed = _timed("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n")
    assert not result.passed
    assert f"output truncated at max_file_mb={LIMITS.max_file_mb}" in result.detail
    assert len(result.detail) < 4000 and elapsed < DEADLINE_S


def test_files_left_in_tmp_are_removed():
    if not any(layer.startswith("uid:") for layer in probe_isolation()):
        pytest.skip("needs root: without a uid of its own the sandbox cannot tell its files "
                    "in /tmp from the caller's")
    marker = f"wmss-sandbox-test-{os.getpid()}"
    result, _ = _timed(f"open('/tmp/{marker}', 'w').write('left behind')\n")
    assert result.passed, result
    assert not os.path.exists(f"/tmp/{marker}")


def test_no_network():
    if "netns" not in probe_isolation():
        pytest.skip("this machine gives the sandbox no network namespace (unprivileged, or no "
                    "user namespaces)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result, _ = _timed(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        """)
    assert result.status == "failed", result
    assert "OSError" in result.detail or "Error" in result.detail


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


def test_humaneval_program_takes_a_whole_function_or_a_body():
    doc = {"prompt": "import math\n\ndef area(r):\n    \"\"\"Circle area.\"\"\"\n",
           "entry_point": "area",
           "test": "def check(candidate):\n    assert abs(candidate(1) - math.pi) < 1e-9\n"}
    body = "    return math.pi * r * r\n"
    whole = "```python\ndef area(r):\n    return math.pi * r ** 2\n```"
    for completion in (body, whole):
        assert run_python(build_program("humaneval", doc, completion), LIMITS).passed
    wrong = "```python\ndef area(r):\n    return 2 * math.pi * r\n```"
    assert not run_python(build_program("humaneval", doc, wrong), LIMITS).passed
