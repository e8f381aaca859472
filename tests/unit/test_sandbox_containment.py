"""The sandbox contains a hostile program, whoever runs the evaluator, and fails closed.

One probe program tries everything at once: write into the evaluator's home, the run
directory, the venv, /dev/shm and /tmp; fill its scratch beyond the cap; reach a server on the
host's loopback; leave a process behind; read the evaluator's environment. It runs as root
(this process, where the suite runs as root) and as an unprivileged user (uid 65534, a fresh
interpreter of a copy of the sandbox module), each against directories that user owns. What
counts is checked on the host afterwards, not taken from the program's word.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import megatron_wmss.evaluation.sandbox as sandbox_module

NOBODY = 65534
SCRATCH_MB = 8
LIMITS = dict(timeout_s=10.0, cpu_s=4, memory_mb=512, max_file_mb=4, scratch_mb=SCRATCH_MB)
SECRET = "WMSS_TEST_SECRET_TOKEN"

PROBE = textwrap.dedent('''\
    import errno, json, os, socket, subprocess, sys
    targets, port, marker = json.loads(sys.argv[1] if len(sys.argv) > 1 else {args!r})
    report = {{"writes": {{}}}}
    for label, path in targets.items():
        try:
            with open(path, "w") as f:
                f.write("escaped")
            report["writes"][label] = "written"
        except OSError as err:
            report["writes"][label] = errno.errorcode.get(err.errno, str(err.errno))
    written = 0
    try:
        for i in range(4 * {scratch_mb}):
            with open(f"/tmp/fill{{i}}", "wb") as f:
                f.write(b"x" * (1 << 20))
            written += 1 << 20
    except OSError as err:
        report["fill_error"] = errno.errorcode.get(err.errno, str(err.errno))
    report["filled_mib"] = written >> 20
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        report["loopback"] = "connected"
    except OSError as err:
        report["loopback"] = type(err).__name__
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    report["env"] = sorted(os.environ)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(json.dumps(report))
    ''')

# Runs the probe through a copy of the sandbox module, as whoever starts it.
DRIVER = textwrap.dedent('''\
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
    sandbox = importlib.util.module_from_spec(spec)
    sys.modules["sandbox"] = sandbox
    spec.loader.exec_module(sandbox)
    result = sandbox.run_python(open(sys.argv[2]).read(), sandbox.SandboxLimits(**json.loads(sys.argv[3])))
    print(json.dumps([result.status, result.returncode, result.detail, result.isolation]))
    ''')


def _owned_dir(root: Path, name: str, uid: int) -> Path:
    path = root / name
    path.mkdir(mode=0o755)
    os.chown(path, uid, uid)
    return path


def _targets(tag: str, home: Path, run_dir: Path, venv: Path) -> dict[str, str]:
    return {"home": str(home / tag), "run_dir": str(run_dir / tag), "venv": str(venv / tag),
            "dev_shm": f"/dev/shm/{tag}", "tmp": f"/tmp/{tag}"}


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _check_contained(report: dict, targets: dict[str, str], marker: str) -> None:
    for label, path in targets.items():
        assert not os.path.exists(path), f"{label}: the program wrote {path} on the host"
    # Inside, only its own /tmp (the scratch tmpfs) takes writes.
    assert report["writes"]["tmp"] == "written"
    assert all(v != "written" for k, v in report["writes"].items() if k != "tmp"), report
    assert report["fill_error"] == "ENOSPC", report           # the tmpfs cap, not a file limit
    assert report["filled_mib"] < SCRATCH_MB, report
    assert report["loopback"] == "ConnectionRefusedError", report  # its own, empty loopback
    assert report["interfaces"] == ["lo"], report
    assert report["env"] == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"], report  # bwrap sets PWD
    time.sleep(0.3)
    assert not _processes_with(marker), "a process the program started outlived it"


@pytest.fixture
def loopback_server():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def _probe_source(targets, port, marker) -> str:
    return PROBE.format(args=json.dumps([targets, port, marker]), scratch_mb=SCRATCH_MB)


def test_a_hostile_program_is_contained_when_the_evaluator_runs_as_itself(
        tmp_path, loopback_server, monkeypatch):
    monkeypatch.setenv(SECRET, "do-not-leak")
    uid = os.getuid()
    home = Path.home() if os.access(Path.home(), os.W_OK) else _owned_dir(tmp_path, "home", uid)
    venv = Path(sys.prefix) if os.access(sys.prefix, os.W_OK) else _owned_dir(tmp_path, "venv", uid)
    tag, marker = f"wmss-escape-{uuid.uuid4().hex}", uuid.uuid4().hex
    targets = _targets(tag, home, _owned_dir(tmp_path, "run", uid), venv)
    try:
        result = sandbox_module.run_python(_probe_source(targets, loopback_server, marker),
                                           sandbox_module.SandboxLimits(**LIMITS))
        assert result.passed and result.isolation == "bwrap", result
        _check_contained(json.loads(result.detail.splitlines()[-1]), targets, marker)
    finally:
        for path in targets.values():
            Path(path).unlink(missing_ok=True)


def _unprivileged_python() -> str:
    """An interpreter uid 65534 can run (a venv under /root is not one)."""
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        path = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if path and subprocess.run([path, "-c", "pass"], user=NOBODY, group=NOBODY,
                                   extra_groups=[], capture_output=True).returncode == 0:
            return path
    pytest.fail("no python3 that uid 65534 can run on /usr/local/bin:/usr/bin:/bin "
                "(install Debian's python3)")


def test_a_hostile_program_is_contained_when_the_evaluator_is_an_ordinary_user(
        loopback_server):
    if os.geteuid() != 0:  # the suite itself runs unprivileged: the test above is this case
        pytest.skip("runs as root only (to become uid 65534); unprivileged, the test above "
                    "is this case")
    python = _unprivileged_python()
    tmp_path = Path(tempfile.mkdtemp(prefix="wmss-unprivileged-"))  # pytest's is 0700
    tmp_path.chmod(0o755)
    code = _owned_dir(tmp_path, "code", 0)
    shutil.copy(sandbox_module.__file__, code / "sandbox.py")
    tag, marker = f"wmss-escape-{uuid.uuid4().hex}", uuid.uuid4().hex
    targets = _targets(tag, _owned_dir(tmp_path, "home", NOBODY),
                       _owned_dir(tmp_path, "run", NOBODY), _owned_dir(tmp_path, "venv", NOBODY))
    (code / "probe.py").write_text(_probe_source(targets, loopback_server, marker))
    (code / "driver.py").write_text(DRIVER)
    for path in code.iterdir():
        path.chmod(0o644)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"),
           SECRET: "do-not-leak"}
    try:
        done = subprocess.run([python, str(code / "driver.py"), str(code / "sandbox.py"),
                               str(code / "probe.py"), json.dumps(LIMITS)], user=NOBODY,
                              group=NOBODY, extra_groups=[], env=env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path / "run")
        assert done.returncode == 0, done.stderr[-2000:]
        status, _, detail, isolation = json.loads(done.stdout.splitlines()[-1])
        assert status == "passed" and isolation == "bwrap", detail
        _check_contained(json.loads(detail.splitlines()[-1]), targets, marker)
    finally:
        for path in targets.values():
            if path.startswith(("/tmp/", "/dev/shm/")):
                Path(path).unlink(missing_ok=True)
        shutil.rmtree(tmp_path)


def _mbpp_job(tmp_path: Path) -> list[str]:
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"task_id": 1, "text": "add", "code": "def add(a, b):\n"
                                "    return a + b\n", "test_list": ["assert add(1, 2) == 3"],
                                "test_setup_code": ""}) + "\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"doc_id": 0, "prediction": "def add(a, b):\n"
                                 "    return a + b\n"}) + "\n")
    return [sys.executable, "-m", "megatron_wmss.cli", "eval", "score", "--task", "mbpp",
            "--data", str(data), "--predictions", str(preds), "--out",
            str(tmp_path / "score.json"), "--allow-code-execution"]


def test_code_tasks_stop_with_one_line_where_isolation_cannot_be_set_up(tmp_path):
    """No bubblewrap on PATH, and (as root) bubblewrap inside a user namespace that allows no
    further ones: the command exits 2 with one line naming what is missing and the opt-out,
    writes nothing and runs nothing; --sandbox rlimits then runs it, and says so."""
    command = _mbpp_job(tmp_path)
    no_bwrap = tmp_path / "bin"
    no_bwrap.mkdir()
    env = dict(os.environ, PATH=str(no_bwrap))
    cases = [("bubblewrap (bwrap) is not on PATH", command, env)]
    bwrap = shutil.which("bwrap")
    if os.geteuid() == 0 and bwrap:
        jail = [bwrap, "--unshare-user", "--disable-userns", "--bind", "/", "/", "--dev", "/dev",
                "--proc", "/proc", "--"]
        cases.append(("cannot hand files to uid", jail + command, dict(os.environ)))
    for expected, argv, environment in cases:
        done = subprocess.run(argv, env=environment, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, (expected, done.stdout, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "cannot isolate" in lines[0] and expected in lines[0], lines[0]
        assert "--sandbox rlimits" in lines[0], lines[0]
        assert not (tmp_path / "score.json").exists()
    done = subprocess.run(command + ["--sandbox", "rlimits"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["score"] == 1.0 and result["sandbox"] == "rlimits"
