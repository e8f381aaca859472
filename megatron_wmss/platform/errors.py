"""Which errors are the user's to fix, and how commands report them.

A user error (bad argument, missing / corrupt / inconsistent input file, impossible parallel
layout) is printed as one line, ``wmss <command>: error: <message>``, with exit status 2, the
convention of ``argparse``. Anything else is a bug or an environment failure and keeps its
traceback (exit status 1). ``WMSS_DEBUG=1`` (``wmss --debug``) prints the traceback of user
errors too. Errors raised on a spawned rank arrive as a ``DistributedRunError`` that carries
each failing rank's exception type and message; the first user error among them is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn, Optional

__all__ = ["ArgumentParser", "UserError", "positive_int", "debug_enabled", "is_user_error", "run_command",
           "user_message"]

DEBUG_ENV = "WMSS_DEBUG"

# Raised by this project (and by megatron's config checks) for input the user controls.
# TypeError, RuntimeError, AssertionError, ... are bugs: they keep their traceback.
_USER_ERROR_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                     IsADirectoryError, PermissionError)


class UserError(ValueError):
    """Input the user can fix; the message names the file or field and what is accepted."""


def is_user_error(exc: BaseException) -> bool:
    """True for the error kinds reported in one line (see the module docstring).

    A KeyError counts only when it carries a message (the project's own name the tensor and the
    checkpoint): a bare missing key, ``KeyError('w')``, is a bug.
    """
    if isinstance(exc, KeyError):
        return len(exc.args) == 1 and isinstance(exc.args[0], str) and " " in exc.args[0]
    return isinstance(exc, _USER_ERROR_TYPES)


def exception_message(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's without the quotes ``str()`` adds)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message to print for ``exc``, or None when it is not a user error.

    For a failed distributed run: the message of the first rank that raised a user error (its
    peers typically fail afterwards only because it went away).
    """
    from megatron_wmss.platform.spawn import DistributedRunError

    if isinstance(exc, DistributedRunError):
        failure = exc.user_failure()
        return None if failure is None else " ".join(failure.exc_message.split())
    return exception_message(exc) if is_user_error(exc) else None


def debug_enabled() -> bool:
    """True when ``WMSS_DEBUG`` is set to anything but empty or ``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run a command; return its exit status (``body``'s, 0 for None, 2 on a user error).

    A user error prints ``{prog}: error: {message}`` on stderr (after its traceback when
    :func:`debug_enabled`). Every other exception propagates, so the interpreter prints its
    traceback and exits with 1.
    """
    try:
        code = body()
    except Exception as exc:  # noqa: BLE001 - classified below; non-user errors re-raised
        message = user_message(exc)
        if message is None:
            raise
        if debug_enabled():
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0 if code is None else code


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with the error as one line, ``{prog}: error: {message}`` (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see `{self.prog} -h`)\n")


def positive_int(text: str) -> int:
    """argparse ``type=`` for an int >= 1 (the parser reports a bad value in one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
