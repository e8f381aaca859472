"""The gloo test harness itself: layouts, error reporting and time-outs."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_wmss.testing import DistributedRunError, run_distributed


def _layout_and_sum():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    value = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(value, group=ps.get_tensor_model_parallel_group())
    return (dist.get_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), value.item())


def test_ranks_get_the_requested_tp_pp_layout_in_rank_order():
    got = run_distributed(_layout_and_sum, world_size=4, tp=2, pp=2, timeout=120)
    # megatron's default order is tp-dp-pp: ranks {0,1} and {2,3} are tensor-parallel pairs.
    assert got == [(0, 0, 0, 0, 1.0), (1, 1, 0, 0, 1.0), (2, 0, 1, 0, 5.0), (3, 1, 1, 0, 5.0)]


def _fail_on_rank_one(message):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise KeyError(message)
    return dist.get_rank()


def _hang_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)
    return dist.get_rank()


def test_failing_rank_traceback_reaches_the_caller():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, world_size=2, args=("needle-1234",), timeout=120)
    assert "failed on rank 1" in str(info.value)
    assert "KeyError: 'needle-1234'" in str(info.value)
    assert "_fail_on_rank_one" in str(info.value)


def test_hung_rank_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"ranks \[1\] did not finish within 12s"):
        run_distributed(_hang_on_rank_one, world_size=2, timeout=12)
    assert time.monotonic() - start < 60


def test_layout_that_does_not_divide_the_world_is_rejected():
    with pytest.raises(ValueError, match="multiple of tp\\*pp"):
        run_distributed(_layout_and_sum, world_size=3, tp=2)


def _device_view():
    import os

    import torch.distributed as dist

    return (os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(),
            dist.get_backend())


def test_test_harness_runs_ranks_on_cpu_with_gloo_even_where_gpus_exist(monkeypatch):
    # The distributed tests compare CPU tensors with CPU references: on a GPU machine their
    # ranks must still be gloo ranks that see no GPU (the same results as on this machine).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    got = run_distributed(_device_view, world_size=2, tp=2, timeout=120)
    assert got == [("", False, "gloo")] * 2
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # the parent's own view is restored


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device must be 'auto' or 'cpu'"):
        run_distributed(_device_view, world_size=1, device="gpu")
