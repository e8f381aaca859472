"""How one rank's failure reaches every rank, so that no rank waits for a peer that has gone.

A per-rank command does the same work on every rank; rank 0 alone writes shared files while
the others wait for it. Were rank 0 to raise there while the others sat at a barrier, they
would wait for a peer that is gone: on NCCL until the watchdog's time-out, under srun until
``--wait`` ends the step. So such a section ends with one collective that carries its
outcome instead of a bare barrier, and on failure every rank raises at once: the failing rank
its own exception, the others :class:`~megatron_wmss.platform.errors.PeerFailure`, which
names that rank, the section and the error in one line (``run_command`` prints it and exits
with the failing rank's code, 1, or 2 for a user error).

    summary = on_rank_zero(lambda: run_select(...), "selection")   # rank 0 works, all get it
    data = rank_zero_first(lambda: tokenize_sft(cfg, tok), "tokenization")  # rank 0 fills a
                                                          # cache, then the others read it
    shard = every_rank(lambda: read_shard(path), "reading")  # each alone, then all agree

``fn`` itself must not wait for other ranks (no collective inside): a failing rank would
announce its failure in a collective its peers never reach.

A failure inside collective code (a rank raising in the middle of a training step or a
checkpoint save) cannot be announced that way: its peers sit in a collective it never enters.
For those the launcher ends the peers: the local launcher (``platform/spawn.py``) kills every
rank once one has reported a failure; under torchrun or srun (``platform/launch.py``) the
failing rank posts a notice in the process group's store (:func:`post_failure`) and every rank
watches for it (:func:`watching_for_peer_failures`) and exits within about a second, wherever
it is blocked; torchrun also stops all workers when one exits non-zero, and srun ends the
step ``--wait`` seconds after the first task exits.

Without an initialized process group the helpers just call ``fn``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

from megatron_wmss.platform.errors import PeerFailure, exception_message, is_user_error

__all__ = ["every_rank", "on_rank_zero", "post_failure", "rank_zero_first", "settle",
           "watching_for_peer_failures"]

T = TypeVar("T")

_FAILED_KEY = "wmss/failed"
_SEEN_KEY = "wmss/failed_seen"
_WATCHED_KEY = "wmss/watched"


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _describe(exc: BaseException) -> tuple[str, str, bool]:
    """(type name, one-line message, user error?) of ``exc``: what its peers are told."""
    return type(exc).__name__, exception_message(exc), is_user_error(exc)


def on_rank_zero(fn: Callable[[], T], what: str, *, share: bool = True,
                 group=None) -> Optional[T]:
    """Run ``fn()`` on rank 0 of ``group`` (default: the world) while the other ranks wait.

    Returns ``fn``'s value on rank 0, and on every rank when ``share`` (it must pickle), else
    None on the others. If ``fn`` raises, rank 0 re-raises it and every other rank raises
    :class:`PeerFailure` naming rank 0, ``what`` and the message. When it returns, rank 0 has
    finished ``fn`` (it also serves as the barrier after rank 0's work). The others wait by
    polling the process group's store, so ``fn`` may take longer than the group's time-out
    (NCCL's is 10 minutes by default; lm-eval on rank 0 takes hours). Collective: one
    ``broadcast_object_list`` from rank 0 of ``group`` (then a barrier if ``fn`` failed).
    """
    if not _initialized():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: Optional[Exception] = None
    value = None
    done = _rank_zero_done_key(group)
    store = _default_store()
    if dist.get_rank(group) == 0:
        try:
            value = fn()
            # Pickled here, where a failure is still rank 0's to announce.
            box[0] = (True, pickle.dumps(value) if share else None)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = exc
            box[0] = (False, _describe(exc))
        if store is not None:
            store.set(done, b"")
    elif store is not None:
        _wait_for_key(store, done)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(box, src=src, group=group)
    ok, payload = box[0]
    if not ok:
        settle(group)
    if error is not None:
        raise error
    if not ok:
        raise PeerFailure(src, what, *payload)
    if dist.get_rank(group) == 0:
        return value
    return pickle.loads(payload) if share else None


_sections: dict[tuple, int] = {}


def _rank_zero_done_key(group) -> str:
    """A store key for this call of :func:`on_rank_zero` in ``group``, the same on every rank
    (they all call it in the same order, as they do collectives)."""
    import torch.distributed as dist

    ranks = () if group is None else tuple(dist.get_process_group_ranks(group))
    _sections[ranks] = number = _sections.get(ranks, 0) + 1
    return f"wmss/rank0/{'-'.join(map(str, ranks)) or 'world'}/{number}"


def _wait_for_key(store, key: str) -> None:
    """Poll ``store`` until ``key`` exists (every 50 ms at first, then every second): no
    time-out. A store that stops answering ends the wait; the collective after it then fails."""
    pause = 0.05
    while True:
        try:
            if store.check([key]):
                return
        except Exception:  # noqa: BLE001 - its host is gone: the broadcast will say so
            return
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


def settle(group=None) -> None:
    """Call on every rank of ``group`` once a failure has been shared, before raising: returns
    when every rank has received it. A failing rank that left right after the collective which
    told its peers could cut them off while they still read it (gloo then reports "Connection
    closed by peer" instead of the error). A peer that goes meanwhile is not an error here."""
    import torch.distributed as dist

    try:
        dist.barrier(group=group)
    except Exception:  # noqa: BLE001 - the failing rank may already be gone
        pass


def every_rank(fn: Callable[[], T], what: str, *, group=None) -> T:
    """Run ``fn()`` on every rank of ``group``, then agree on the outcome before returning.

    If ``fn`` raised on some ranks, each of those re-raises its own exception and every other
    rank raises :class:`PeerFailure` naming the lowest failing rank. ``fn`` must not wait for
    its peers (no collective that a failing rank could miss): its failures are announced
    after it returns. Collective: one ``all_gather_object`` of a small status (then a barrier
    if some rank failed).
    """
    if not _initialized():
        return fn()
    import torch.distributed as dist

    value, error = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - announced below, then raised
        error = exc
    statuses: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(statuses, None if error is None else _describe(error), group=group)
    if any(status is not None for status in statuses):
        settle(group)
    if error is not None:
        raise error
    for index, status in enumerate(statuses):
        if status is not None:
            rank = index if group is None else dist.get_global_rank(group, index)
            raise PeerFailure(rank, what, *status)
    return value


def rank_zero_first(fn: Callable[[], T], what: str, *, group=None) -> T:
    """``fn()`` on rank 0, then, once it succeeded, on the other ranks (rank 0 fills a cache
    that the others read instead of racing to fill it); every rank returns its own value.
    A failure anywhere is raised on every rank as in :func:`every_rank`."""
    first = on_rank_zero(fn, what, share=False, group=group)
    if not _initialized():
        return first
    import torch.distributed as dist

    mine = dist.get_rank(group) == 0
    return every_rank(lambda: first if mine else fn(), what, group=group)


# --- a notice for failures inside collectives (torchrun / srun ranks) -----------------------

def _default_store():
    import torch.distributed as dist

    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get is None or not _initialized():
        return None
    try:
        return get()
    except (RuntimeError, ValueError):
        return None


def post_failure(exc: BaseException, *, linger: float = 5.0) -> None:
    """Tell every rank watching (:func:`watching_for_peer_failures`) that this rank failed with
    ``exc``; wait up to ``linger`` seconds for them to read it (rank 0 may host the store,
    which goes with its process), not at all where no rank watches (the local launcher stops
    the ranks itself). Best effort: a store that is gone is ignored. May be called again for
    the same failure: only the first failure is told."""
    store = _default_store()
    if store is None:
        return
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if store.add(_FAILED_KEY + "/count", 1) == 1:  # the first failure is the one told
            store.set(_FAILED_KEY, pickle.dumps((rank, *_describe(exc))))
        if not store.check([_WATCHED_KEY]):
            return
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and store.add(_SEEN_KEY, 0) < world - 1:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store went with a peer: nobody left to tell
        pass


def _acknowledge(store) -> None:
    try:
        store.add(_SEEN_KEY, 1)
    except Exception:  # noqa: BLE001 - store gone
        pass


@contextlib.contextmanager
def watching_for_peer_failures(prog: str = "wmss", interval: float = 1.0) -> Iterator[None]:
    """While inside, a thread polls the process group's store every ``interval`` seconds for a
    peer's :func:`post_failure` notice; on one it prints ``{prog}: error: rank N failed
    (...): message`` and ends this process at once (``os._exit``: the main thread may be
    blocked in a collective that never returns), with exit status 2 for a user error, else 1.
    A notice this rank posted itself (code that told its peers before cleaning up) ends the
    watch instead. A store that stops answering (its host, rank 0, has ended) stops the watch
    silently: the launcher handles what follows."""
    store = _default_store()
    if store is None:
        yield
        return
    import torch.distributed as dist

    me = dist.get_rank()
    store.set(_WATCHED_KEY, b"")
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            try:
                if not store.check([_FAILED_KEY]):
                    continue
                rank, exc_type, message, user_error = pickle.loads(store.get(_FAILED_KEY))
                if stop.is_set() or rank == me:  # this rank is leaving anyway (it failed)
                    return
                store.add(_SEEN_KEY, 1)
            except Exception:  # noqa: BLE001 - store gone: see the docstring
                return
            text = exception_message(PeerFailure(rank, None, exc_type, message, user_error))
            sys.stdout.flush()
            print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
            os._exit(2 if user_error else 1)

    thread = threading.Thread(target=watch, name="wmss-peer-failure-watch", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as exc:
        stop.set()
        if isinstance(exc, PeerFailure):
            _acknowledge(store)  # told in-process: the failing rank need not wait for this one
        elif isinstance(exc, Exception):
            post_failure(exc)
        raise
    finally:
        stop.set()
        thread.join(timeout=interval + 5.0)
