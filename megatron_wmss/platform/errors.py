"""Which errors are the user's to fix, and how commands report them.

A user error (bad argument, missing / corrupt / inconsistent input file, impossible parallel
layout) is printed as one line, ``wmss <command>: error: <message>``, with exit status 2, the
convention of ``argparse``. Anything else is a bug or an environment failure and keeps its
traceback (exit status 1). ``WMSS_DEBUG=1`` (``wmss --debug``) prints the traceback of user
errors too. Errors raised on a spawned rank arrive as a ``DistributedRunError`` that carries
each failing rank's exception type and message; the first user error among them is reported.
A rank that stops because a peer failed (:class:`PeerFailure`, raised by
:mod:`megatron_wmss.platform.ranks`) prints that peer's error in one line and exits like it (2
for a user error, else 1), never with the preemption code 75.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ["ArgumentParser", "DistributedRunError", "PeerFailure", "RankFailure", "UserError",
           "debug_enabled", "exception_message", "is_user_error", "positive_int", "run_command",
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


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """What one rank raised, as sent to the parent (exceptions themselves may not pickle)."""

    rank: int
    exc_type: str
    """The exception class name, e.g. ``ValueError``."""
    exc_message: str
    traceback: str
    user_error: bool
    """See :func:`is_user_error`."""
    peer: Optional[int] = None
    """For a :class:`PeerFailure`: the rank whose failure stopped this one; None for a root
    cause."""


class DistributedRunError(RuntimeError):
    """A distributed run failed on some rank or timed out.

    ``str()`` is the full report: every failing rank's traceback, root causes first (the first
    to fail first, then the ranks that stopped because of a peer). ``failures`` holds them as
    :class:`RankFailure` in that order (empty on a time-out or when a rank died without
    reporting); ``rank``, ``exc_type``, ``exc_message`` and ``traceback`` are the first
    failure's, None when there is none.
    """

    def __init__(self, report: str, failures: Sequence[RankFailure] = ()) -> None:
        super().__init__(report)
        self.failures = list(failures)
        first = self.failures[0] if self.failures else None
        self.rank = None if first is None else first.rank
        self.exc_type = None if first is None else first.exc_type
        self.exc_message = None if first is None else first.exc_message
        self.traceback = None if first is None else first.traceback

    def __reduce__(self):
        return type(self), (str(self), self.failures)

    def user_failure(self) -> RankFailure | None:
        """The first failure that is a user error (its peers often fail only as a result)."""
        return next((f for f in self.failures if f.user_error), None)


class PeerFailure(RuntimeError):
    """Raised on every rank that waited for a peer which failed (see
    :mod:`megatron_wmss.platform.ranks`): names the failing rank, what it was doing and its
    error in one line. ``user_error`` is the peer's (so every rank exits with the same code)."""

    def __init__(self, rank: int, what: Optional[str], exc_type: str, exc_message: str,
                 user_error: bool) -> None:
        detail = exc_message if user_error else f"{exc_type}: {exc_message}"
        super().__init__(f"rank {rank} failed" + (f" ({what})" if what else "") + f": {detail}")
        self.rank, self.what, self.exc_type = rank, what, exc_type
        self.exc_message, self.user_error = exc_message, user_error

    def __reduce__(self):
        return type(self), (self.rank, self.what, self.exc_type, self.exc_message,
                            self.user_error)


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message to print for ``exc``, or None when it is not a user error.

    For a failed distributed run: the message of the first rank that raised a user error (its
    peers typically fail afterwards only because it went away).
    """
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
    except PeerFailure as exc:
        # This rank only waited for the one that failed; that one prints its own error (with
        # its traceback when it is a bug), so this rank's traceback would only bury it.
        if debug_enabled():
            traceback.print_exc()
        print(f"{prog}: error: {exception_message(exc)}", file=sys.stderr)
        return 2 if exc.user_error else 1
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
