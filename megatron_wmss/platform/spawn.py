"""Run a function on N local processes with a megatron-core parallel state.

The distributed test harness, and the single-node launcher of commands such as ``wmss
import-hf`` (multi-node jobs use torchrun / Slurm instead).

``run_distributed(fn, world_size, tp=2, pp=1)`` spawns ``world_size`` processes, joins them in
one gloo process group (a ``FileStore`` in a fresh temporary directory, so concurrent runs never
fight over a port), applies the CPU shims for megatron-core when CUDA is absent, initializes
megatron's parallel state with the given tensor/pipeline sizes (data parallel is what remains),
calls ``fn(*args, **kwargs)`` on every rank and returns the per-rank results in rank order.

A rank that raises makes the whole run raise :class:`DistributedRunError` carrying that rank's
traceback, exception type and message; a run that outlives ``timeout`` seconds (a hung
collective, say) kills every rank and raises naming the ranks that never finished. ``fn`` must
be a module-level function and its arguments and result picklable, since ranks are started
with ``spawn``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from megatron_wmss.platform.errors import (
    DistributedRunError,
    PeerFailure,
    RankFailure,
    exception_message,
    is_user_error,
)

__all__ = ["run_distributed"]


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    parallel: tuple[int, int],
    skip_shims: tuple[str, ...],
    call: bytes,
    results: "mp.Queue",
) -> None:
    # One intra-op thread per rank: several ranks share the machine's few cores, and
    # oversubscription makes gloo runs slower by an order of magnitude.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    reported = False
    try:
        from megatron_wmss.platform.backends import quiet_expected_megatron_warnings

        quiet_expected_megatron_warnings()
        # Unpickled only now: loading fn's module may import megatron-core, whose import-time
        # warnings the filter above must already cover.
        fn, args, kwargs = pickle.loads(call)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from megatron_wmss.platform import apply_cpu_shims

        apply_cpu_shims(skip=skip_shims)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
        )
        if torch.cuda.is_available():
            # megatron orders communication and compute through one hardware queue; set before
            # the CUDA context exists (as torchrun users do in their environment).
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            torch.cuda.set_device(rank % torch.cuda.device_count())
        from megatron.core import parallel_state

        tp, pp = parallel
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            # Report before the teardown: the parent stops every rank on the first failure,
            # and a teardown that waits for peers (NCCL's, while they sit in a collective)
            # must not hold the report back.
            results.put((rank, False, _rank_failure(rank, exc)))
            reported = True
            raise
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        # Plain pickle copies tensors by value; torch's queue reducers would share memory
        # that vanishes with this process before the parent reads it.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        if not reported:
            results.put((rank, False, _rank_failure(rank, exc)))


def _rank_failure(rank: int, exc: BaseException) -> RankFailure:
    """``exc`` (being handled) as the parent receives it."""
    return RankFailure(rank, type(exc).__name__, exception_message(exc), traceback.format_exc(),
                       is_user_error(exc), exc.rank if isinstance(exc, PeerFailure) else None)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    skip_shims: Sequence[str] = (),
    device: str = "auto",
    forward_signals: Sequence[int] = (),
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return results in rank order.

    ``tp`` and ``pp`` are megatron's tensor- and pipeline-parallel sizes; the data-parallel size
    is ``world_size // (tp * pp)``. ``skip_shims`` names CPU shims to leave out (used by the
    tests that prove each shim is needed). ``timeout`` is in seconds for the whole run.
    ``device="auto"`` gives NCCL with one GPU per rank where there are at least
    ``world_size`` GPUs (NCCL cannot put two ranks of a group on one GPU), gloo on CPU
    otherwise; ``device="cpu"`` hides every GPU from the ranks (``CUDA_VISIBLE_DEVICES=""``
    before they start), so they run on CPU with gloo and the CPU shims on any machine.
    ``forward_signals``: signals this process passes on to every rank while they run (a
    launcher's SIGTERM/SIGUSR1 must reach the trainers it started).
    """
    if device not in ("auto", "cpu"):
        raise ValueError(f"device must be 'auto' or 'cpu', got {device!r}")
    if device == "auto" and _gpu_count() < world_size:
        device = "cpu"
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
        raise ValueError(
            f"world_size={world_size} must be a multiple of tp*pp (tp={tp}, pp={pp}), "
            "with tp >= 1 and pp >= 1"
        )
    call = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="wmss-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(
                    rank, world_size, store_path, (tp, pp), tuple(skip_shims), call, results,
                ),
                name=f"wmss-rank{rank}",
                # Not daemonic: ranks may start children (dist_checkpointing's writer Manager).
                # The finally below kills every rank still alive, whatever happened.
            )
            for rank in range(world_size)
        ]
        with _visible_gpus("" if device == "cpu" else None):
            for proc in procs:
                proc.start()
        ok = False
        try:
            with _forwarding(forward_signals, procs):
                values = _collect(procs, results, world_size, timeout, fn)
            ok = True
            return [pickle.loads(v) for v in values]
        finally:
            _stop(procs, grace=30.0 if ok else 0.0)


@contextlib.contextmanager
def _forwarding(signals: Sequence[int], procs):
    """While inside, deliver each of ``signals`` received here to every live rank."""
    import signal as signal_module

    def forward(signum, frame):
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    previous = {sig: signal_module.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal_module.signal(sig, handler)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _visible_gpus(value: str | None):
    """Set ``CUDA_VISIBLE_DEVICES`` for processes started inside (``None``: leave it)."""
    if value is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _stop(procs, grace: float) -> None:
    """Let finished ranks exit (within ``grace`` s), then kill every rank with its children:
    a rank's helpers (dist_checkpointing's writer Manager) must not outlive it."""
    import psutil

    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 0.0))
    for proc in procs:
        if proc.is_alive():
            try:
                tree = psutil.Process(proc.pid)
                victims = tree.children(recursive=True) + [tree]
            except psutil.NoSuchProcess:
                victims = []
            for victim in victims:
                try:
                    victim.kill()
                except psutil.NoSuchProcess:
                    pass
        proc.join(timeout=10)


def _collect(procs, results, world_size, timeout, fn) -> list[Any]:
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise DistributedRunError(
                f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f}s "
                "(a hung collective or a rank blocked on a peer that failed)"
            )
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [
                i for i, p in enumerate(procs)
                if i not in values and not p.is_alive() and p.exitcode not in (0, None)
            ]
            if dead and results.empty():
                # A rank died without reporting (segfault, os._exit, killed for memory).
                time.sleep(0.5)
                if results.empty():
                    codes = {i: procs[i].exitcode for i in dead}
                    raise DistributedRunError(
                        f"{fn.__name__}: ranks exited without a result, exit codes {codes}"
                    )
            continue
        if not ok:
            raise DistributedRunError(*_failure_report(fn, value, results))
        values[rank] = value
    return [values[r] for r in range(world_size)]


def _failure_report(fn, first: RankFailure, results, grace: float = 2.0
                    ) -> tuple[str, list[RankFailure]]:
    """The first failing rank's traceback, then those of ranks that failed right after it
    (often only because their peer went away), so the root cause reads first; and the
    failures in that order. A rank that stopped because a peer failed (``peer`` set) may
    report before that peer does: root causes go first."""
    failures = [first]
    deadline = time.monotonic() + grace
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            _, ok, value = results.get(timeout=remaining)
        except queue.Empty:
            break
        if not ok:
            failures.append(value)
    failures.sort(key=lambda f: f.peer is not None)  # stable: arrival order within each kind
    head, *rest = failures
    report = [f"{getattr(fn, '__name__', fn)} failed on rank {head.rank}:\n{head.traceback}"]
    report += [f"then on rank {f.rank}:\n{f.traceback}" for f in rest]
    return "\n".join(report), failures
