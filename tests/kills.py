"""SIGKILL a command at seeded random wall-clock moments, rerunning it after each kill.

Each attempt is killed at a moment drawn uniformly over ``duration``, the measured wall clock
of an uninterrupted run, counted from the attempt's start. The first attempt of a run
directory is the uninterrupted run's double, so its kill lands in any stage with the stage's
share of the time (startup, tokenization, each pass, each save, the report); a rerun skips or
resumes what is done, so its kill lands later in the work. An attempt that ends before its
moment has finished the run: that run directory's round is over and the next kill starts a
fresh one, so every kill counted is a real one. Each attempt runs in its own session and the
kill goes to its process group, so the ranks and workers it spawned die with it, as they would
when a node is lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Attempt:
    delay: float | None
    """Seconds after its start at which the attempt was to be killed; None: run to the end."""
    killed: bool
    """False: it ended on its own before the moment came."""
    returncode: int
    log: str
    """Its stdout and stderr, interleaved."""

    @property
    def last_line(self) -> str:
        """What it printed last, progress bars left out: where in its life it was."""
        lines = [line for line in self.log.splitlines() if line.strip() and "%|" not in line]
        return lines[-1][:120] if lines else "(no output yet)"


def _attempt(command: list[str], log_path: Path, delay: float | None, timeout: float,
             env=None) -> Attempt:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: nobody reads while the attempt runs, and a full pipe would stall it.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        killed = False
        try:
            proc.wait(timeout=timeout if delay is None else delay)
        except subprocess.TimeoutExpired:
            killed = delay is not None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group ended between the wait and the kill
                pass
            proc.wait()
            if not killed:
                raise AssertionError(f"{command} did not finish in {timeout}s:\n"
                                     f"{log_path.read_text()[-3000:]}")
    return Attempt(delay, killed, proc.returncode, log_path.read_text())


def kill_rounds(command_for, *, duration: float, kills: int, seed: int, log_dir: Path,
                per_round: int = 5, timeout: float = 600, env=None, on_attempt=None):
    """Yield ``(round, attempts)`` until ``kills`` attempts have been killed in all.

    ``command_for(round)`` is the command line of that round's fresh run directory. A round
    ends when an attempt ends on its own, or after ``per_round`` kills with one more attempt
    run to the end; its attempts come out in order, the finishing one last. ``on_attempt(round,
    i, attempt)`` is called after each attempt."""
    rng = random.Random(seed)
    done, round_ = 0, 0
    while done < kills:
        attempts: list[Attempt] = []
        while True:
            room = min(per_round, kills - done) - sum(a.killed for a in attempts)
            delay = rng.uniform(0.0, duration) if room > 0 else None
            attempt = _attempt(command_for(round_), log_dir / f"round{round_}-{len(attempts)}.log",
                               delay, timeout, env)
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(round_, len(attempts) - 1, attempt)
            if not attempt.killed:
                break
        done += sum(a.killed for a in attempts)
        yield round_, attempts
        round_ += 1


def failures(attempts: list[Attempt]) -> list[str]:
    """What went wrong in the attempts: a traceback anywhere, a nonzero exit of one that was not
    killed, a final attempt that was not a clean finish."""
    out = []
    for i, attempt in enumerate(attempts):
        if "Traceback" in attempt.log:
            out.append(f"attempt {i} printed a traceback:\n{attempt.log[-3000:]}")
        elif not attempt.killed and attempt.returncode != 0:
            out.append(f"attempt {i} exited {attempt.returncode}:\n{attempt.log[-3000:]}")
    return out


def describe(attempts: list[Attempt]) -> str:
    """One line: when each attempt was killed and what it had printed last."""
    return "; ".join(
        f"killed {a.delay:.1f} s in after {a.last_line!r}" if a.killed else
        f"ended (exit {a.returncode})" for a in attempts)
