"""Rank discovery for per-rank commands: torchrun, srun, or a single process."""

from __future__ import annotations

import pytest

from megatron_wmss.platform.launch import first_slurm_host, rank_info_from_env


def test_torchrun_variables_win():
    info = rank_info_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                               "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
                               "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port,
            info.launcher) == (3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_one_task_per_rank_takes_the_master_from_the_node_list():
    info = rank_info_from_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16",
                               "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                               "SLURM_JOB_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "4242"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == \
        (5, 16, 5, "gpu07", "slurm")
    assert info.master_port == 20000 + 4242  # the same on every rank of the job


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("a,b", "a"),
                                             ("cn[001-004]", "cn001"), ("x[3,5-6],y1", "x3")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_no_launcher_is_one_process():
    info = rank_info_from_env({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_bad_rank_variable_names_it():
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        rank_info_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_a_batch_script_outside_srun_is_one_process_not_rank_0_of_n():
    info = rank_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert (info.world_size, info.launcher) == (1, "single")
