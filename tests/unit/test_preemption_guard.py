"""PreemptionGuard: a USR1/SIGTERM sent to every process of the job (what Slurm does) must not
kill the helper process megatron's checkpoint saves write through."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megatron_wmss.training.signals import PreemptionGuard

    def signal_children(sig):
        for child in psutil.Process().children(recursive=True):
            os.kill(child.pid, sig)
        time.sleep(1.0)

    if sys.argv[1] == "guarded":
        with PreemptionGuard() as guard:
            queue = fa._results_queue
            assert queue is not None, "the guard did not start the writer queue"
            signal_children(signal.SIGUSR1)
            signal_children(signal.SIGTERM)
            queue.put("written")
            assert queue.get(timeout=10) == "written"
            os.kill(os.getpid(), signal.SIGUSR1)  # the rank itself still sees the signal
            time.sleep(0.2)
            assert guard.received == signal.SIGUSR1, guard.received
    else:  # "bare": megatron's own first save starts it unshielded; this run dies (checked by
        # hand, kept out of the suite for time: `python -c "$_SCRIPT" bare` exits non-zero)
        queue = fa._get_write_results_queue()
        signal_children(signal.SIGUSR1)
        queue.put("written")
    print("ok")
""")


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True,
                          text=True, timeout=120)


def test_the_checkpoint_writer_queue_outlives_usr1_and_sigterm():
    guarded = _run("guarded")
    assert guarded.returncode == 0 and guarded.stdout.strip() == "ok", guarded.stderr
