"""Grades one model-written program inside the sandbox, so that only a complete test run passes.

Standard library only: the sandbox runs this file as ``python -I -S code_harness.py`` with
the job (JSON) on stdin. Two processes, so that nothing the model's code does can fake a pass:

- the *grader* (this script): reads the job and a nonce from stdin, then makes itself
  non-dumpable (no other process of its uid may read its memory, its ``/proc`` files or its
  file descriptors, or ptrace it) and starts
- the *program* (this script with ``serve``): a fresh interpreter that runs the model's code
  and then answers calls over two pipes.

The benchmark's tests and helpers run in the grader, with the names the tests take from the
model's code (HumanEval's entry point, MBPP's functions and classes) bound to proxies. What
crosses the pipes is plain data of exact builtin types (None, bool, int, float, complex, str,
bytes, list, tuple, dict, set, frozenset) or an opaque reference to an object that stays in
the program: a result that overrides ``__eq__`` cannot come back as anything the tests would
compare as equal, and ``sys.exit``, ``os._exit``, ``atexit``, signals, patched builtins or
a rewritten ``check`` all act in the program's process only. A program that ends while the
tests still need it, in its load or any call, fails as "exited".

Only when every test has run, and the program has answered a final ping, does the grader
print ``<nonce> <verdict JSON>`` as its last line; the program never sees the nonce (not in
any file, argument or environment variable, and the grader's memory is closed to it), so
nothing it prints can pass for a verdict.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import os
import subprocess
import sys
import traceback

_MAX_MESSAGE = 32 * 1024 * 1024   # bytes of one reply from the program
_MAX_INT_DIGITS = 100_000         # hex digits of one int in a reply
_LOG = "/tmp/program.log"          # the program's stdout and stderr (in its tmpfs)
_PR_SET_DUMPABLE = 4


class ProgramExited(BaseException):
    """The program ended before the tests were done with it (never caught by the tests'
    ``except Exception``)."""


class ProtocolError(BaseException):
    """The program sent something that is not a well-formed reply."""


class ProgramError(Exception):
    """An exception raised in the program whose type is not a builtin exception."""


# ------------------------------------------------------------------------------ the codec
def encode(value, refs=None):
    """Plain data as JSON-able tags; other objects become references when ``refs`` (the
    program's table) is given, else TypeError."""
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return {"i": format(value, "x")}
    if kind is float:
        return {"f": value.hex()}
    if kind is complex:
        return {"c": [value.real.hex(), value.imag.hex()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is list:
        return [encode(item, refs) for item in value]
    if kind in (tuple, set, frozenset):
        tag = {tuple: "t", set: "s", frozenset: "z"}[kind]
        return {tag: [encode(item, refs) for item in value]}
    if kind is dict:
        return {"d": [[encode(k, refs), encode(v, refs)] for k, v in value.items()]}
    if kind is Remote:
        return {"r": object.__getattribute__(value, "_ref")}
    if refs is None:
        raise TypeError(f"a {kind.__name__} cannot be passed to the program (plain data only)")
    refs.append(value)
    return {"r": len(refs) - 1}


def decode(data, resolve):
    """The inverse of :func:`encode`; ``resolve(ref)`` turns a reference into an object.
    Strict: anything else is a ProtocolError (the other side may be hostile)."""
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is list:
        return [decode(item, resolve) for item in data]
    if type(data) is not dict or len(data) != 1:
        raise ProtocolError(f"not a value: {str(data)[:80]}")
    (tag, body), = data.items()
    if tag == "i" and type(body) is str and len(body) <= _MAX_INT_DIGITS:
        return int(body, 16)
    if tag == "f" and type(body) is str:
        return float.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag in ("t", "s", "z") and type(body) is list:
        items = [decode(item, resolve) for item in body]
        return {"t": tuple, "s": set, "z": frozenset}[tag](items)
    if tag == "d" and type(body) is list:
        return {decode(k, resolve): decode(v, resolve) for k, v in body}
    if tag == "r" and type(body) is int:
        return resolve(body)
    raise ProtocolError(f"not a value: {str(data)[:80]}")


# ------------------------------------------------------------------------------ the grader
class Channel:
    """The grader's end of the pipes to the program."""

    def __init__(self, proc: subprocess.Popen, requests, replies):
        self.proc, self.requests, self.replies = proc, requests, replies

    def ask(self, message: dict):
        try:
            self.requests.write(json.dumps(message).encode() + b"\n")
            self.requests.flush()
        except OSError:
            raise ProgramExited("the program ended") from None
        line = self.replies.readline(_MAX_MESSAGE + 1)
        if not line.endswith(b"\n"):
            if len(line) > _MAX_MESSAGE:
                raise ProtocolError(f"a reply longer than {_MAX_MESSAGE} bytes")
            raise ProgramExited("the program ended")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise ProtocolError("a reply that is not JSON") from None
        if type(reply) is not dict or len(reply) != 1:
            raise ProtocolError(f"a malformed reply: {line[:80]!r}")
        (kind, body), = reply.items()
        if kind == "ok":
            return decode(body, lambda ref: Remote(self, ref))
        if kind == "raise" and type(body) is list and len(body) == 2 \
                and all(type(part) is str for part in body):
            raise _exception(*body)
        if kind == "exit":
            raise ProgramExited(f"the program called exit ({str(body)[:80]})")
        raise ProtocolError(f"a malformed reply: {line[:80]!r}")


def _exception(name: str, message: str) -> BaseException:
    """A builtin exception type by name (so tests that expect ValueError see one), else
    ProgramError; never a BaseException-only type."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a type whose constructor wants more
            pass
    return ProgramError(f"{name}: {message}")


class Remote:
    """An object that lives in the program. Calls, attribute reads, iteration, ``len`` and
    indexing go to the program and come back as plain data or references; equality is
    identity and truth testing is refused, so the program cannot decide a comparison."""

    __slots__ = ("_channel", "_ref")

    def __init__(self, channel: Channel, ref: int):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)

    def _ask(self, op: str, **fields):
        return self._channel.ask({"op": op, "r": self._ref, **fields})

    def __call__(self, *args, **kwargs):
        return self._ask("call", args=encode(list(args)),
                         kwargs=encode(dict(kwargs)))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __len__(self):
        value = self._ask("len")
        if type(value) is not int:
            raise TypeError("len() of a program object did not return an int")
        return value

    def __getitem__(self, key):
        return self._ask("getitem", key=encode(key))

    def __bool__(self):
        raise TypeError("an object of the program cannot be tested for truth by the tests")

    def __repr__(self):
        return f"<object #{self._ref} of the program>"


def _free_names(source: str) -> list[str]:
    """Names the test code reads but neither defines nor finds among the builtins."""
    tree = ast.parse(source)
    bound, read = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read.append if isinstance(node.ctx, ast.Load) else bound.add)(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return [n for n in dict.fromkeys(read) if n not in bound and not hasattr(builtins, n)]


def _log_tail() -> str:
    try:
        with open(_LOG, "rb") as f:
            f.seek(max(os.fstat(f.fileno()).st_size - 1500, 0))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe(error: BaseException, test: str) -> str:
    """The exception and the line of the tests it came from."""
    lines = test.splitlines()
    where = next((f"test line {f.lineno}: {lines[f.lineno - 1].strip()}"
                  for f in reversed(traceback.extract_tb(error.__traceback__))
                  if f.filename == "<tests>" and 0 < f.lineno <= len(lines)), "")
    text = f"{type(error).__name__}: {error}".strip().rstrip(":")
    return f"{text} ({where})" if where else text


def _end_of(proc: subprocess.Popen) -> str:
    """How the program ended, once it has."""
    try:
        code = proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return "the program stopped answering"
    if code < 0:
        import signal
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"the program was killed by {name}"
    return f"the program exited with status {code}"


def grade(job: dict) -> dict:
    """Run the job's tests against its program; the verdict as a dict."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    log = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    proc = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), "serve", str(requests_r),
         str(replies_w)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        pass_fds=(requests_r, replies_w), cwd="/tmp")
    for fd in (requests_r, replies_w, log):
        os.close(fd)
    channel = Channel(proc, os.fdopen(requests_w, "wb"), os.fdopen(replies_r, "rb"))
    namespace: dict = {"__name__": "__tests__"}
    try:
        exec(compile(job.get("setup") or "", "<setup>", "exec"), namespace)
        # The tests' own modules are imported here, never taken from the program (which may
        # have patched them); every other name they need comes from the program.
        wanted = list(job.get("names") or [])
        for name in _free_names(job["test"]):
            if name in wanted or name in namespace:
                continue
            if name in sys.stdlib_module_names:
                namespace[name] = importlib.import_module(name)
            else:
                wanted.append(name)
        loaded = channel.ask({"op": "load", "code": job["program"], "names": wanted})
        if type(loaded) is not dict:
            raise ProtocolError("a malformed load reply")
        namespace.update((name, loaded[name]) for name in wanted if name in loaded)
        exec(compile(job["test"], "<tests>", "exec"), namespace)
        if channel.ask({"op": "ping"}) != "pong":
            raise ProtocolError("a wrong answer to the final ping")
    except AssertionError as error:
        verdict = {"status": "failed", "reason": "tests failed", "detail": _describe(error, job["test"])}
    except ProgramExited as error:
        why = _end_of(proc)
        status = "timeout" if "SIGXCPU" in why else "exited"
        verdict = {"status": status, "reason": "exited early" if status == "exited" else
                   "cpu limit", "detail": f"{error}; {why}"}
    except ProtocolError as error:
        verdict = {"status": "error", "reason": "malformed reply", "detail": str(error)}
    except MemoryError as error:
        verdict = {"status": "limit", "reason": "memory limit", "detail": _describe(error, job["test"])}
    except BaseException as error:  # noqa: BLE001 - anything else the tests raised
        verdict = {"status": "error", "reason": "the tests raised", "detail": _describe(error, job["test"])}
    else:
        verdict = {"status": "passed", "reason": "all tests ran", "detail": ""}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log_tail = _log_tail()
    if log_tail and verdict["status"] != "passed":
        verdict["detail"] += "\nprogram output:\n" + log_tail
    return verdict


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the pipe that brought the nonce is gone
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit("grader: cannot make itself non-dumpable")
    verdict = grade(job)
    sys.stdout.flush()
    os.write(1, f"\n{nonce} {json.dumps(verdict)}\n".encode())


# ----------------------------------------------------------------------------- the program
def serve(requests_fd: int, replies_fd: int) -> None:
    """The program's side: run the model's code, then answer the grader's requests. Nothing
    here is trusted by the grader, which checks every reply."""
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    refs: list = []

    def reply(kind: str, body) -> None:
        replies.write(json.dumps({kind: body}).encode() + b"\n")
        replies.flush()

    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "load":
                exec(compile(request["code"], "program.py", "exec"), namespace)
                result = {}
                for name in request["names"]:
                    if name in namespace:
                        result[name] = namespace[name]
                reply("ok", encode(result, refs))
                continue
            if op == "ping":
                reply("ok", "pong")
                continue
            target = refs[request["r"]]

            def arg(data):
                return decode(data, refs.__getitem__)
            if op == "call":
                value = target(*arg(request["args"]), **arg(request["kwargs"]))
            elif op == "getattr":
                value = getattr(target, request["name"])
            elif op == "iter":
                value = iter(target)
            elif op == "next":
                value = next(target)
            elif op == "len":
                value = len(target)
            elif op == "getitem":
                value = target[arg(request["key"])]
            else:
                raise ValueError(f"unknown request {op!r}")
            reply("ok", encode(value, refs))
        except (SystemExit, KeyboardInterrupt) as error:
            reply("exit", repr(error))
            raise
        except BaseException as error:  # noqa: BLE001 - reported to the grader
            reply("raise", [type(error).__name__, str(error)[:2000]])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
