"""Run untrusted Python (model-written code) in a subprocess that cannot hurt the evaluator.

Layers, each applied where the machine allows it and reported in ``SandboxResult.isolation``:

- ``rlimits``: CPU seconds, address space, file size, open files, no core dumps.
- ``netns``: a fresh network namespace, without even a loopback interface up.
- ``pidns``: a fresh PID namespace. Its init is ours; when it exits the kernel kills every
  process the program left behind, even those that called ``setsid`` or forked away.
- ``uid:N``: as root, the program runs as a uid of its own, unused by anything else, taken
  from a pool of ``_UID_POOL`` uids from ``_UID_BASE``. Files it leaves in the world-writable
  temporary directories are removed afterwards.
- ``nproc``: RLIMIT_NPROC counts only the program's own processes: the dedicated uid above,
  or (not root) a user namespace of its own. Without it the limit still applies but is shared
  with the caller's other processes, and a fork bomb is only stopped by the wall clock.

Process layout: the caller starts this file as a script (the *supervisor*, ``python -I -S
sandbox.py CONFIG``; so this file imports the standard library only). The supervisor enters
the namespaces and forks the namespace's *init*, which forks the *program* (rlimits, uid
switch, ``PR_SET_NO_NEW_PRIVS``, exec of ``python -I program.py``) and reaps whatever is
orphaned. The supervisor enforces the wall clock by killing init; without a PID namespace it
is a child subreaper and kills the program's descendants itself. The caller kills the
supervisor's process group as a last resort. No ``preexec_fn`` anywhere: safe from threads.

Not a container: the program can read what its uid may read, and may write files up to
``max_file_mb`` each into world-writable directories for as long as it runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxLimits", "SandboxResult", "probe_isolation", "run_python"]

_UID_BASE, _UID_POOL = 0x70000000, 4096   # far above any real or subordinate uid range
_DETAIL_CHARS = 2000                      # the tail of the output kept in SandboxResult.detail
_READ_BYTES = 64 * 1024                   # at most this much of each output file is read back
_GRACE_S = 15.0                           # the caller's backstop beyond timeout_s
_MIB = 1024 * 1024
_CLONE_NEWNS_FLAGS = {"user": 0x10000000, "pid": 0x20000000, "net": 0x40000000}
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_PROBE_SOURCE = ("import bisect, collections, functools, hashlib, heapq, itertools, json, math, "
                 "random, re, string, typing\nprint('ok')\n")


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; exceeding any of them fails (or times out) the program."""

    timeout_s: float = 10.0
    """Wall clock in seconds; then every process of the program is killed."""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU; SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 1024
    """Address space per process in MiB (RLIMIT_AS; an allocation beyond it is MemoryError)."""
    max_processes: int = 16
    """Processes and threads at once (RLIMIT_NPROC; see the module docstring for its scope)."""
    max_file_mb: int = 16
    """Largest file the program may write, its captured stdout/stderr included (RLIMIT_FSIZE)."""

    def __post_init__(self):
        for name, low in (("timeout_s", 0.1), ("cpu_s", 1), ("memory_mb", 64),
                          ("max_processes", 1), ("max_file_mb", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                raise ValueError(f"SandboxLimits.{name} must be a number >= {low}, got {value!r}")
        for name in ("cpu_s", "memory_mb", "max_processes", "max_file_mb"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"SandboxLimits.{name} must be an integer, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended."""

    status: str
    """"passed" (exit status 0), "failed" (any other end), "timeout" (wall clock or CPU)."""
    returncode: int | None
    """The program's exit status, -N for signal N, None when it never ran or was killed."""
    detail: str
    """Why it was killed, then the last ~2 KB of its stderr (or stdout when stderr is empty)."""
    isolation: tuple[str, ...]
    """The layers that applied (module docstring), e.g. ("rlimits", "netns", "pidns", ...)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------------- caller
@dataclass(frozen=True)
class _Plan:
    python: str          # interpreter of the program
    switch_uid: bool     # run each program under a uid of its own (root only)


_plan_lock, _plan_cache = threading.Lock(), []
_uid_lock, _uids_in_use = threading.Lock(), {}   # uid -> fd of its held lock file


def _proc_uids() -> set[int]:
    """Real uids of every process now alive (zombies included)."""
    uids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uids.update(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except OSError:
                pass  # exited meanwhile
    return uids


def _lock_dir() -> str:
    """A directory only we may write, for the uid locks shared by every evaluator process."""
    path = os.path.join(tempfile.gettempdir(), f"wmss-sandbox-uids-{os.geteuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid() \
            or st.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a private directory of uid {os.geteuid()}; "
                           "remove it so that the sandbox can make its own")
    return path


def _acquire_uid() -> int:
    """A uid no process uses and no other sandbox holds: the pool is shared between processes
    (tensor-parallel ranks, concurrent jobs) through one ``flock``-ed file per uid."""
    with _uid_lock:
        locks, busy = _lock_dir(), set(_uids_in_use) | _proc_uids()
        for uid in range(_UID_BASE, _UID_BASE + _UID_POOL):
            if uid in busy:
                continue
            fd = os.open(os.path.join(locks, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process's sandbox holds it
                os.close(fd)
                continue
            _uids_in_use[uid] = fd
            return uid
    raise RuntimeError(f"all {_UID_POOL} sandbox uids from {_UID_BASE} are in use")


def _release_uid(uid: int) -> None:
    for top in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:  # what the program left where anyone may write
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    _remove(entry.path)
            except OSError:
                pass
    with _uid_lock:
        os.close(_uids_in_use.pop(uid))  # closing the file drops its lock


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        def retry(func, failed, _):  # a directory the program made unreadable (not as root)
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)
        shutil.rmtree(path, onerror=retry)
    else:
        os.unlink(path)


def _tail(fd: int) -> tuple[str, int]:
    """The last characters of an output file and its size in bytes."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, _READ_BYTES), max(size - _READ_BYTES, 0))
    return data.decode("utf-8", "replace")[-_DETAIL_CHARS:], size


def _run(source: str, limits: SandboxLimits, plan: _Plan) -> SandboxResult:
    uid = _acquire_uid() if plan.switch_uid else None
    scratch = tempfile.mkdtemp(prefix="wmss-sandbox-")
    fds: list[int] = []
    try:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8",
                  errors="surrogateescape") as f:
            f.write(source)
        for name in ("stdout", "stderr"):  # read back through these fds, never by name
            fds.append(os.open(os.path.join(scratch, name),
                               os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        if uid is not None:
            os.chown(scratch, uid, uid)
        os.chmod(scratch, 0o700)
        config = {
            "python": plan.python, "stdout_fd": fds[0], "stderr_fd": fds[1], "uid": uid,
            "timeout_s": limits.timeout_s, "max_processes": limits.max_processes,
            "rlimits": [  # [name, soft, hard]
                ["RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1],  # SIGXCPU, then SIGKILL
                ["RLIMIT_AS", limits.memory_mb * _MIB, limits.memory_mb * _MIB],
                ["RLIMIT_FSIZE", limits.max_file_mb * _MIB, limits.max_file_mb * _MIB],
                ["RLIMIT_NOFILE", 256, 256], ["RLIMIT_CORE", 0, 0]]}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
               "TMPDIR": scratch}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=scratch, env=env, start_new_session=True, pass_fds=tuple(fds))
        try:
            out, err = proc.communicate(timeout=limits.timeout_s + _GRACE_S)
        except subprocess.TimeoutExpired:  # the supervisor hung: its group goes, init with it
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return _result(out, err, proc.returncode, fds, limits)
    finally:
        for fd in fds:
            os.close(fd)
        _remove(scratch)
        if uid is not None:
            _release_uid(uid)


def _result(out: bytes, err: bytes, code: int, fds: list[int], limits: SandboxLimits):
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = err.decode("utf-8", "replace")[-_DETAIL_CHARS:]
        return SandboxResult("failed", None, f"sandbox supervisor failed (exit status {code}): "
                             f"{why}", ())
    isolation = tuple(report["isolation"])
    if report.get("error"):
        return SandboxResult("failed", None, f"sandbox could not start the program: "
                             f"{report['error']}", isolation)
    (stdout, out_size), (stderr, err_size) = _tail(fds[0]), _tail(fds[1])
    tail = stderr if stderr.strip() else stdout
    notes = [f"output truncated at max_file_mb={limits.max_file_mb}"
             for size in (out_size, err_size) if size >= limits.max_file_mb * _MIB][:1]
    status = report["status"]
    returncode = None if status is None else os.waitstatus_to_exitcode(status)
    if status is None:
        notes.insert(0, f"killed after timeout_s={limits.timeout_s} s of wall clock")
        verdict = "timeout"
    elif returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        notes.insert(0, f"killed by {signal.Signals(-returncode).name} (cpu_s={limits.cpu_s})")
        verdict = "timeout"
    else:
        verdict = "passed" if returncode == 0 else "failed"
        if returncode < 0:
            notes.insert(0, f"killed by {signal.Signals(-returncode).name}")
    detail = "\n".join(notes + [tail] if tail else notes)
    return SandboxResult(verdict, returncode, detail[-_DETAIL_CHARS - 200:], isolation)


def _plan() -> _Plan:
    """Which interpreter and uid scheme work here; probed once (a few short runs)."""
    with _plan_lock:
        if _plan_cache:
            return _plan_cache[0]
        probe_limits = SandboxLimits(timeout_s=30.0)
        plan = _Plan(sys.executable, False)
        if os.geteuid() == 0:
            # The program's uid must be able to read its interpreter and standard library: a
            # venv under /root may not be. Prefer an interpreter of our exact version whose
            # executable lives under its own prefix (not a binary that fell back to another
            # installation's libpython), then any of our minor version.
            minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
            candidates = [sys.executable, os.path.realpath(sys.executable),
                          shutil.which(minor, path="/usr/local/bin:/usr/bin:/bin"),
                          shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
            check = (_PROBE_SOURCE + "import os, sys\nprint(sys.version_info[:2] == "
                     f"{tuple(sys.version_info[:2])}, sys.version == {sys.version!r}, "
                     "os.path.realpath(sys.executable).startswith(sys.base_prefix + os.sep))\n")
            ranked = []
            for python in dict.fromkeys(c for c in candidates if c):
                result = _run(check, probe_limits, _Plan(python, True))
                words = result.detail.split()
                if result.passed and words[-3] == "True":
                    ranked.append(((words[-1] == "True", words[-2] == "True"), python))
            if ranked:
                plan = _Plan(max(ranked, key=lambda item: item[0])[1], True)
        _plan_cache.append(plan)
        return plan


def probe_isolation() -> tuple[str, ...]:
    """The isolation layers a program gets on this machine (what ``run_python`` reports)."""
    return _run(_PROBE_SOURCE, SandboxLimits(timeout_s=30.0), _plan()).isolation


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as the script of a fresh ``python -I`` in a scratch directory (its cwd,
    removed afterwards). Never raises for anything the program does. Thread-safe."""
    return _run(source, limits or SandboxLimits(), _plan())


# ------------------------------------------------------------------------------- supervisor
def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("prctl", "unshare"):
        getattr(libc, name).restype = ctypes.c_int
    return libc


def _enter_namespaces(libc, isolation: list[str]) -> bool:
    """Net + PID namespaces (with a user namespace when not root); True if the PID one."""
    uid, gid = os.getuid(), os.getgid()
    user = [] if os.geteuid() == 0 else ["user"]
    for kinds in (user + ["net", "pid"], user + ["net"]):
        flags = sum(_CLONE_NEWNS_FLAGS[k] for k in kinds)
        if libc.unshare(flags) == 0:
            break
    else:
        return False
    if user:  # map ourselves to ourselves: no privilege inside, exec drops the namespace caps
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    isolation.extend(f"{k}ns" for k in kinds)
    return "pid" in kinds


def _exec_program(config: dict, libc) -> None:
    """In the forked program process: limits, credentials, then exec (never returns)."""
    import resource

    try:
        os.dup2(config["stdout_fd"], 1)
        os.dup2(config["stderr_fd"], 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(3, 1 << 16)
        for name, soft, hard in config["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        nproc = config["max_processes"]
        if config["uid"] is None and "userns" not in config["isolation"]:
            nproc += _count_processes(os.getuid())  # shared with the caller's own processes
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if config["uid"] is not None:
            os.setgroups([])
            os.setgid(config["uid"])
            os.setuid(config["uid"])
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        python = config["python"]
        os.execv(python, [python, "-I", "program.py"])
    except BaseException as err:  # noqa: BLE001 - reported on the program's stderr
        os.write(2, f"sandbox: cannot start the program: {err!r}\n".encode())
    os._exit(127)


def _count_processes(uid: int) -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit()
               and _owner(entry) == uid)


def _owner(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def _wait(pid: int, deadline: float | None) -> int | None:
    """Reap children until ``pid`` ends; its wait status, or None at ``deadline``."""
    pause = 0.001
    while True:
        try:
            done, status = os.waitpid(-1, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:
            return None
        if done == pid:
            return status
        if done == 0:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


def _kill_descendants() -> None:
    """Without a PID namespace: as a subreaper every orphan is our child; kill until none."""
    me = os.getpid()
    while True:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        tree, frontier = set(), {me}
        while frontier:
            frontier = {p for p, parent in parents.items() if parent in frontier} - tree
            tree |= frontier
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


def _supervise(config: dict) -> dict:
    libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    isolation = config["isolation"] = ["rlimits"]
    pidns = _enter_namespaces(libc, isolation)
    if config["uid"] is not None:
        isolation.append(f"uid:{config['uid']}")
    if config["uid"] is not None or "userns" in isolation:
        isolation.append("nproc")
    deadline = time.monotonic() + config["timeout_s"]
    if not pidns:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        program = os.fork()
        if program == 0:
            _exec_program(config, libc)
        status = _wait(program, deadline)
        _kill_descendants()
        return {"status": status, "isolation": isolation}
    read_end, write_end = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the new namespace: reap until the program ends, report, exit
        try:
            os.close(read_end)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            program = os.fork()
            if program == 0:
                _exec_program(config, libc)
            os.write(write_end, str(_wait(program, None)).encode())
        finally:
            os._exit(0)  # the kernel now kills everything left in the namespace
    os.close(write_end)
    if _wait(init, deadline) is None:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)  # returns once the namespace is empty
        return {"status": None, "isolation": isolation}
    with os.fdopen(read_end) as f:
        text = f.read()
    return {"status": int(text), "isolation": isolation} if text.strip().lstrip("-").isdigit() \
        else {"status": None, "error": "init reported nothing", "isolation": isolation}


if __name__ == "__main__":
    print(json.dumps(_supervise(json.loads(sys.argv[1]))))
