"""Preemption: SIGTERM / SIGUSR1 mean "finish this step, save, exit with PREEMPTION_EXIT_CODE".

Slurm sends ``--signal=USR1@<seconds>`` before a time limit and SIGTERM on preemption; torchrun
forwards SIGTERM to its workers. The handler only sets a flag (no I/O, no exceptions inside a
signal handler); at the end of each step :meth:`PreemptionGuard.should_exit` all-reduces MAX
of the flag and of the wall-clock limit over all ranks, so every rank saves and stops at the
same step even when only some of them got the signal.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_wmss.platform import cuda_available

__all__ = ["PREEMPTION_EXIT_CODE", "PreemptionGuard"]

#: Exit code of a run that saved and stopped on a signal or its time limit: the Slurm script
#: requeues on exactly this code (any other non-zero code is a failure, not requeued).
PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _start_checkpoint_queue_shielded() -> None:
    """Start megatron's checkpoint-writer queue now, in a process that USR1/SIGTERM cannot kill.

    ``dist_checkpointing.save`` sends its write results through a queue served by a *spawned*
    multiprocessing Manager, started on the first save. Slurm delivers ``--signal`` and
    preemption signals to every process of a job step, and a fresh interpreter dies of USR1
    (its default action), so the save running at that moment failed with BrokenPipeError.
    Signals blocked while it is spawned stay blocked in it (the mask survives fork and exec),
    and those that arrive here meanwhile are delivered once unblocked, not lost. The server
    (and multiprocessing's resource tracker, which spawning needs) still shuts down with this
    process; like any child, it outlives only a SIGKILL of it.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return  # another megatron-core layout, or already started
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        # Spawning starts multiprocessing's resource tracker first, which unblocks SIGTERM in
        # this thread when it is up: start it before, and block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionGuard:
    """Installs the flag-setting handlers on enter, restores the previous ones on exit."""

    def __init__(self, exit_duration_minutes: Optional[float] = None) -> None:
        self.received: Optional[int] = None
        # Counted from this process's start, as a job's time limit is (set-up included).
        import psutil

        started = psutil.Process().create_time()
        self.deadline = (started + 60.0 * exit_duration_minutes
                         if exit_duration_minutes else None)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        _start_checkpoint_queue_shielded()
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_exit(self) -> Optional[str]:
        """Collective: why every rank must save and exit now (a signal name or "time limit"),
        or None."""
        local = [0.0 if self.received is None else float(self.received),
                 float(self.deadline is not None and time.time() >= self.deadline)]
        device = torch.cuda.current_device() if cuda_available() else "cpu"
        flags = torch.tensor(local, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, timed_out = flags.tolist()
        if signum:
            return signal.Signals(int(signum)).name
        if timed_out:
            return "time limit (trainer.exit_duration_minutes)"
        return None
