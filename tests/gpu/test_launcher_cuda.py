"""The local launcher on a GPU machine: NCCL with one GPU per rank, gloo when GPUs are short."""

from __future__ import annotations

import torch

from megatron_wmss.platform.spawn import run_distributed


def _backend_and_device():
    import torch.distributed as dist

    return dist.get_backend(), torch.cuda.is_available() and torch.cuda.current_device()


def test_auto_device_uses_nccl_with_one_gpu_per_rank():
    n = torch.cuda.device_count()
    got = run_distributed(_backend_and_device, world_size=n, timeout=300)
    assert got == [("nccl", rank) for rank in range(n)]


def test_auto_device_falls_back_to_gloo_when_ranks_outnumber_gpus():
    # NCCL refuses two ranks of one group on one GPU: such runs go to CPU instead.
    n = torch.cuda.device_count() + 1
    got = run_distributed(_backend_and_device, world_size=n, timeout=300)
    assert got == [("gloo", False)] * n
