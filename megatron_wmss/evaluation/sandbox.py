"""Run untrusted Python (model-written code) where it cannot hurt the evaluator.

Two isolation modes, chosen by ``wmss eval --sandbox`` (environment ``WMSS_SANDBOX``):

- ``bwrap`` (the default): bubblewrap (Debian package ``bubblewrap``) starts the program in
  fresh user, PID, network, IPC, UTS and cgroup namespaces, as uid/gid 65534 with no
  capabilities, no further user namespaces and a session of its own. It sees a minimal
  filesystem, all read-only: ``/usr`` (with the ``/bin``, ``/lib*`` links), its interpreter's
  prefix, ``/etc/ld.so.cache``, ``/proc`` and a minimal ``/dev``; nothing of ``/root``,
  ``/home``, the run directory, the venv or the host's ``/tmp``. Its one writable place is
  ``/tmp``, a tmpfs of ``scratch_mb`` (its cwd and ``$HOME``); ``/dev/shm`` is an empty
  read-only tmpfs. The environment is cleared (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``). Its
  network namespace holds only a loopback of its own: the host's loopback services are out of
  reach. When the program's first process ends, bubblewrap's init ends and the kernel kills
  everything left in the PID namespace. Where any of this cannot be set up, nothing runs:
  :class:`IsolationUnavailable`, one line saying what failed and how to opt out.
- ``rlimits`` (explicit opt-in only): the limits below, a cleared environment and a scratch
  directory as cwd, its own session killed at the end; no namespaces. The program can read
  and write what its uid may, and reach the network.

In both modes: rlimits (CPU seconds, address space, file size, open files, processes, no core
dumps) and a wall clock. As root, every program runs under a uid of its own from a pool of
``_UID_POOL`` (shared between evaluator processes through ``flock``-ed files), because the
kernel never applies RLIMIT_NPROC to uid 0: a fork bomb would otherwise run until the wall
clock. Not as root, the program shares the caller's uid and its process count.

Process layout: the caller starts this file as a script (the *launcher*, ``python -I -S
sandbox.py CONFIG``; so this file imports the standard library only), which sets the rlimits,
switches uid and runs bubblewrap (or the program) as a child subreaper: what the command
orphans is reparented to it, killed and reaped (bubblewrap's outer process does not reap its
namespace's init, which would otherwise stay a zombie wherever PID 1 does not reap). The
caller's wall clock sends the launcher SIGTERM, which kills the command (bubblewrap's
``--die-with-parent`` takes the namespace with it). No ``preexec_fn``: safe from threads.
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
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

__all__ = ["ISOLATION_MODES", "SANDBOX_ENV", "IsolationUnavailable", "SandboxLimits",
           "SandboxResult", "SandboxRun", "require_isolation", "run_python", "run_sandboxed",
           "sandbox_mode"]

SANDBOX_ENV = "WMSS_SANDBOX"
ISOLATION_MODES = ("bwrap", "rlimits")
_UID_BASE, _UID_POOL = 0x70000000, 4096   # far above any real or subordinate uid range
_SANDBOX_UID = 65534                      # the program's uid inside the user namespace
_DETAIL_CHARS = 2000                      # the tail of the output kept in results
_READ_BYTES = 64 * 1024                   # at most this much of each output file is read back
_GRACE_S = 5.0                            # CPU limit's SIGKILL and teardown beyond timeout_s
_MIB = 1024 * 1024
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_CODE_DIR = "/sandbox"                    # where the program's files appear (bwrap mode)


class IsolationUnavailable(RuntimeError):
    """This machine cannot give programs the isolation asked for; nothing was run."""


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
    scratch_mb: int = 64
    """Size of the program's writable tmpfs (``/tmp``, bwrap mode): all its files together."""

    def __post_init__(self):
        for name, low in (("timeout_s", 0.1), ("cpu_s", 1), ("memory_mb", 64),
                          ("max_processes", 1), ("max_file_mb", 1), ("scratch_mb", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                raise ValueError(f"SandboxLimits.{name} must be a number >= {low}, got {value!r}")
        for name in ("cpu_s", "memory_mb", "max_processes", "max_file_mb", "scratch_mb"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"SandboxLimits.{name} must be an integer, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxRun:
    """How one sandboxed command ended, and the tails of what it printed."""

    returncode: Optional[int]
    """Exit status, -N for signal N (bwrap mode reports a signal as 128 + N and it is mapped
    back), None when killed at the wall clock."""
    stdout: str
    """The last ``_READ_BYTES`` of its stdout."""
    stderr: str
    """The last ``_READ_BYTES`` of its stderr."""
    notes: tuple[str, ...]
    """Why it was stopped, if it was (wall clock, CPU limit, output truncated)."""
    isolation: str
    """The mode it ran under: "bwrap" or "rlimits"."""

    @property
    def timed_out(self) -> bool:
        return self.returncode is None or self.returncode == -signal.SIGXCPU


@dataclass(frozen=True)
class SandboxResult:
    """How one plain program (:func:`run_python`) ended."""

    status: str
    """"passed" (exit status 0), "failed" (any other end), "timeout" (wall clock or CPU)."""
    returncode: Optional[int]
    detail: str
    """Why it was killed, then the last ~2 KB of its stderr (or stdout when stderr is empty)."""
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def sandbox_mode(mode: Optional[str] = None) -> str:
    """``mode``, else ``$WMSS_SANDBOX``, else "bwrap"; ValueError naming the accepted ones."""
    mode = mode or os.environ.get(SANDBOX_ENV) or "bwrap"
    if mode not in ISOLATION_MODES:
        raise ValueError(f"sandbox mode {mode!r} is not one of {', '.join(ISOLATION_MODES)} "
                         f"(--sandbox / {SANDBOX_ENV})")
    return mode


# ------------------------------------------------------------------------------ uid pool
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
    """A uid no process uses and no other sandbox holds (tensor-parallel ranks and concurrent
    jobs share the pool through one ``flock``-ed file per uid)."""
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


def _release_uid(uid: int, sweep: bool) -> None:
    if sweep:  # rlimits mode: what the program left where anyone may write
        for top in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        _remove(entry.path)
                except OSError:
                    pass
    with _uid_lock:
        os.close(_uids_in_use.pop(uid))  # closing the file drops its lock


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        def retry(func, failed, _):  # a directory the program made unreadable
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)
        shutil.rmtree(path, onerror=retry)
    else:
        os.unlink(path)


# --------------------------------------------------------------------------------- caller
def _interpreter_prefix(python: str) -> str:
    return os.path.dirname(os.path.dirname(python))


def _bwrap_argv(bwrap: str, python: str, code_dir: str, limits: SandboxLimits) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(_SANDBOX_UID),
            "--gid", str(_SANDBOX_UID), "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
            "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    prefix = _interpreter_prefix(python)
    if not (prefix + "/").startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    return argv + [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(64 * 1024), "--tmpfs", "/dev/shm", "--remount-ro", "/dev/shm",
        "--size", str(limits.scratch_mb * _MIB), "--tmpfs", "/tmp",
        "--ro-bind", code_dir, _CODE_DIR, "--chdir", "/tmp", "--"]


def _tail(path: str) -> tuple[str, int]:
    """The last characters of an output file and its size in bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(size - _READ_BYTES, 0))
        return f.read(_READ_BYTES).decode("utf-8", "replace"), size


def _launch(mode: str, python: str, script: str, args: Sequence[str], files: Mapping[str, str],
            stdin: bytes, limits: SandboxLimits, interpreter_flags: Sequence[str]) -> SandboxRun:
    """Run ``python <flags> <script> <args>`` with ``files`` (name -> text) beside it."""
    uid = _acquire_uid() if os.geteuid() == 0 else None
    work = tempfile.mkdtemp(prefix="wmss-sandbox-")
    try:
        code_dir, scratch = os.path.join(work, "code"), os.path.join(work, "scratch")
        os.mkdir(code_dir)
        os.mkdir(scratch)
        for name, text in files.items():
            with open(os.path.join(code_dir, name), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write(text)
        outputs = [os.path.join(work, name) for name in ("stdout", "stderr")]
        if uid is not None:  # the launcher drops to `uid` before it reads or runs anything
            try:
                for path in (work, code_dir, scratch,
                             *(os.path.join(code_dir, n) for n in files)):
                    os.chown(path, uid, uid)
            except OSError as err:  # e.g. root of a user namespace that maps no other uid
                raise IsolationUnavailable(f"cannot hand files to uid {uid}: {err}") from None
        if mode == "bwrap":
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                raise IsolationUnavailable("bubblewrap (bwrap) is not on PATH")
            command = _bwrap_argv(bwrap, python, code_dir, limits) + [
                python, *interpreter_flags, f"{_CODE_DIR}/{script}", *args]
            cwd = scratch
        else:
            command = [python, *interpreter_flags, os.path.join(code_dir, script), *args]
            cwd = scratch
        config = {
            "argv": command, "uid": uid, "max_processes": limits.max_processes,
            "rlimits": [  # [name, soft, hard]
                ["RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1],  # SIGXCPU, then SIGKILL
                ["RLIMIT_AS", limits.memory_mb * _MIB, limits.memory_mb * _MIB],
                ["RLIMIT_FSIZE", limits.max_file_mb * _MIB, limits.max_file_mb * _MIB],
                ["RLIMIT_NOFILE", 256, 256], ["RLIMIT_CORE", 0, 0]]}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
               "TMPDIR": scratch}
        with open(outputs[0], "wb") as out, open(outputs[1], "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env=env,
                start_new_session=True)
        try:
            proc.communicate(stdin, timeout=limits.timeout_s)
            returncode: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
            proc.terminate()  # the launcher kills the command and reaps what it left
            try:
                proc.wait(_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # last resort: the launcher is stuck
                proc.wait()
        if returncode is not None and returncode > 128:
            returncode = -(returncode - 128)  # the launcher reports signal N as 128 + N
        (stdout, out_size), (stderr, err_size) = _tail(outputs[0]), _tail(outputs[1])
    finally:
        _remove(work)
        if uid is not None:
            _release_uid(uid, sweep=mode == "rlimits")
    notes = []
    if returncode is None:
        notes.append(f"killed after timeout_s={limits.timeout_s} s of wall clock")
    elif returncode == -signal.SIGXCPU:
        notes.append(f"killed by SIGXCPU (cpu_s={limits.cpu_s})")
    elif returncode < 0 and -returncode in signal.valid_signals():
        notes.append(f"killed by {signal.Signals(-returncode).name}")
    if max(out_size, err_size) >= limits.max_file_mb * _MIB:
        notes.append(f"output truncated at max_file_mb={limits.max_file_mb}")
    return SandboxRun(returncode, stdout, stderr, tuple(notes), mode)


_probe_lock, _probed = threading.Lock(), {}   # mode -> interpreter, or the reason it failed


def _candidates() -> list[str]:
    """Interpreters of our exact minor version, ours first: a sandbox uid cannot read a
    venv's base interpreter under /root, so a system one may have to stand in."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [os.path.realpath(sys.executable)]
    for name in (minor, "python3"):
        path = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if path:
            found.append(os.path.realpath(path))
    return list(dict.fromkeys(found))


def _interpreter(mode: str) -> str:
    """The program's interpreter for ``mode``, checked once per process by running a probe
    under the full isolation; IsolationUnavailable (one line) where none works."""
    with _probe_lock:
        if mode not in _probed:
            want = f"{sys.version_info.major}.{sys.version_info.minor}"
            probe = "import sys; print('%d.%d' % sys.version_info[:2])\n"
            why = "no interpreter ran"
            for python in _candidates():
                try:
                    run = _launch(mode, python, "probe.py", (), {"probe.py": probe}, b"",
                                  SandboxLimits(timeout_s=30.0), ("-I", "-S"))
                except IsolationUnavailable as err:
                    why = str(err)
                    break
                if run.returncode == 0 and run.stdout.split()[-1:] == [want]:
                    _probed[mode] = python
                    break
                last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])
                why = f"{python}: {last[-1]}"
            if mode not in _probed:
                _probed[mode] = IsolationUnavailable(why)
        found = _probed[mode]
    if isinstance(found, IsolationUnavailable):
        raise IsolationUnavailable(
            f"the code sandbox cannot isolate programs here ({found}); it needs bubblewrap "
            "(apt-get install bubblewrap) with user, PID and network namespaces allowed. "
            "To run model-written code with rlimits only (no namespaces, no read-only "
            f"filesystem), pass --sandbox rlimits (or set {SANDBOX_ENV}=rlimits)")
    return found


def require_isolation(mode: Optional[str] = None) -> str:
    """Check once per process that ``mode`` works here; returns the mode.
    IsolationUnavailable (one line: what failed, how to opt into rlimits) where it does not."""
    mode = sandbox_mode(mode)
    _interpreter(mode)
    return mode


def run_sandboxed(script: str, files: Mapping[str, str], *, args: Sequence[str] = (),
                  stdin: bytes = b"", limits: Optional[SandboxLimits] = None,
                  mode: Optional[str] = None,
                  interpreter_flags: Sequence[str] = ("-I",)) -> SandboxRun:
    """Run ``files[script]`` with a fresh ``python -I`` (flags: ``interpreter_flags``),
    ``files`` beside it, ``stdin`` on its standard input. Never raises for what the program
    does; IsolationUnavailable when ``mode`` cannot be had here. Thread-safe."""
    mode = sandbox_mode(mode)
    return _launch(mode, _interpreter(mode), script, args, files, stdin,
                   limits or SandboxLimits(), interpreter_flags)


def run_python(source: str, limits: Optional[SandboxLimits] = None,
               mode: Optional[str] = None) -> SandboxResult:
    """Run ``source`` as a script in the sandbox; passed means exit status 0. For programs
    the caller wrote: grading model code goes through :mod:`.code`, where exit status 0
    proves nothing."""
    limits = limits or SandboxLimits()
    run = run_sandboxed("program.py", {"program.py": source}, limits=limits, mode=mode)
    tail = (run.stderr if run.stderr.strip() else run.stdout)[-_DETAIL_CHARS:]
    status = "timeout" if run.timed_out else "passed" if run.returncode == 0 else "failed"
    detail = "\n".join([*run.notes, tail] if tail else run.notes)
    return SandboxResult(status, run.returncode, detail, run.isolation)


# ------------------------------------------------------------------------------- launcher
def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _descendants() -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass  # exited meanwhile
    tree, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree


def _launcher(config: dict) -> int:
    """Limits and credentials, then run the command as a child subreaper: every process it
    orphans (bubblewrap's namespace init included, which its outer process does not reap)
    comes back here to be killed and reaped. SIGTERM (the caller's wall clock) kills the
    command. Returns the command's exit status, 128 + N for signal N (as bubblewrap does)."""
    import ctypes
    import resource
    import time

    for name, soft, hard in config["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    # RLIMIT_NPROC counts every process of the real uid: a pool uid has none but ours, the
    # caller's own uid (not root) shares it with the caller's processes.
    nproc = _count_processes(os.getuid()) + config["max_processes"] + 3  # + us, bwrap's two
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    child = os.fork()
    if child == 0:
        try:
            os.execv(config["argv"][0], config["argv"])
        finally:
            os._exit(127)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    while True:  # whatever the command left: kill, reap, until nothing is left
        left = _descendants()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not left:
                break
        time.sleep(0.002)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    try:
        code = _launcher(json.loads(sys.argv[1]))
    except BaseException as error:  # noqa: BLE001 - reported on the program's stderr
        print(f"sandbox: cannot start the program: {error!r}", file=sys.stderr)
        code = 127
    sys.stdout.flush()
    os._exit(code)
