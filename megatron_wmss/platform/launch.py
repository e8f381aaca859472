"""Per-rank start-up for commands launched by torchrun, srun, or nobody (one process).

Rank variables are read in this order:
- torchrun (and other PyTorch elastic launchers): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- Slurm with one task per rank (``srun --ntasks-per-node=GPUS``): ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` (a batch script outside ``srun`` is one process); the master is the first host of
  ``SLURM_JOB_NODELIST`` (``MASTER_ADDR`` wins when set), the port ``MASTER_PORT`` or one derived
  from ``SLURM_JOB_ID``;
- neither: a single process (world size 1).
NCCL with one GPU per local rank where CUDA exists, gloo (with the CPU shims) otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

__all__ = ["RankInfo", "distributed_from_env", "first_slurm_host", "rank_info_from_env"]


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def rank_info_from_env(env: Optional[Mapping[str, str]] = None) -> RankInfo:
    """Who this process is, from the launcher's environment variables (see module doc)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                        _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                        env.get("MASTER_ADDR", "127.0.0.1"),
                        _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500, "torchrun")
    # srun sets SLURM_STEP_NUM_TASKS; a batch script itself (no srun) has SLURM_PROCID=0 and
    # SLURM_NTASKS=N too, and taking it for rank 0 of N would wait for N-1 peers forever.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        master = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else \
            20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
        return RankInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                        _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                        master, port, "slurm")
    return RankInfo(0, 1, 0, "127.0.0.1", _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def distributed_from_env(tp: int, pp: int, env: Optional[Mapping[str, str]] = None
                         ) -> Iterator[RankInfo]:
    """Join the process group the launcher set up and initialize megatron's parallel state
    (data parallel is what tp x pp leaves); tear both down on exit.

    Inside, a rank that raises tells every rank, and a rank told ends at once with that error
    (:func:`megatron_wmss.platform.ranks.watching_for_peer_failures`): its peers may be
    blocked in a collective it will never enter."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_wmss.platform.cpu_shims import apply_cpu_shims
    from megatron_wmss.platform.ranks import watching_for_peer_failures

    info = rank_info_from_env(env)
    if info.world_size % (tp * pp):
        raise ValueError(f"world size {info.world_size} ({info.launcher}) is not a multiple of "
                         f"tensor x pipeline parallel size = {tp} x {pp}")
    cuda = torch.cuda.is_available()
    if cuda:
        # megatron orders communication and compute kernels through one hardware queue; it
        # must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    apply_cpu_shims()
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    try:
        with watching_for_peer_failures():
            yield info
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
