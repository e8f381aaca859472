"""A joint train step on one GPU (local spec; Transformer Engine spec and FP8 where TE imports)
against the CPU run from the same weights, and TE ⇄ local checkpoint compatibility.

The CPU reference trains in fp32 with gloo; the GPU runs load its initial checkpoint and train
in bf16 on the same batches (tests/distributed/test_joint_training.py's data).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_wmss.platform import te_available
from megatron_wmss.platform.spawn import run_distributed as run_on_gpu
from megatron_wmss.testing import run_distributed as run_on_cpu
from tests.distributed.test_joint_training import (
    GLOBAL_BATCH,
    MICRO_BATCH,
    SEQ,
    STEPS,
    _global_batches,
    _micro_batches,
    _model_config,
)

# bf16 weights and activations against fp32: the same bf16 run on CPU is within 4e-4 nats of
# the fp32 losses (~5.6) over the 3 steps; GPU kernels round differently but alike in size,
# so 1e-2 leaves 25x room while a wrong loss (mask, scale, λ) moves it by >= 0.1. FP8 GEMMs
# (e4m3, 3 mantissa bits, delayed scaling) in the layers add noise of a few 1e-2 on top.
BF16_LOSS_ATOL, FP8_LOSS_ATOL = 1e-2, 5e-2

needs_te = pytest.mark.skipif(not te_available(),
                              reason="Transformer Engine does not import (or no CUDA)")


def _setup(params_dtype, impl="local", fp8=None, freeze_weak=False):
    from megatron.core import parallel_state as ps

    from megatron_wmss.config import MixConfig, OptimConfig, ParallelConfig
    from megatron_wmss.training import setup_training

    cfg = dataclasses.replace(_model_config(), params_dtype=params_dtype,
                              transformer_impl=impl, fp8=fp8)
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(),
                              ps.get_pipeline_model_parallel_world_size())
    optim = OptimConfig(lr=1e-3, warmup_fraction=0.0, lr_schedule="constant")
    return setup_training(cfg, parallel, optim, STEPS,
                          mix=MixConfig(mix_lambda=0.5, freeze_weak=freeze_weak))


def _train(setup):
    from megatron_wmss.training import train_step

    batches = _micro_batches(0, 1)
    return [train_step(setup, batches, num_microbatches=GLOBAL_BATCH // MICRO_BATCH,
                       micro_batch_size=MICRO_BATCH, seq_length=SEQ).loss
            for _ in range(STEPS)]


def _cpu_reference(workdir):
    from megatron_wmss.models.checkpoint import save_model_checkpoint

    setup = _setup("float32")
    save_model_checkpoint(setup.model[0], f"{workdir}/init")
    return _train(setup)


def _gpu_run(workdir, impl, fp8):
    from megatron_wmss.platform import cuda_available

    assert cuda_available(), "the GPU run must see CUDA"
    setup = _setup("bfloat16", impl=impl, fp8=fp8)
    setup.load_weights(f"{workdir}/init")
    assert next(setup.unwrapped.parameters()).is_cuda
    return _train(setup)


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpu-joint")
    (losses,) = run_on_cpu(_cpu_reference, world_size=1, args=(str(workdir),), timeout=300)
    return workdir, losses


@pytest.mark.parametrize("impl,fp8,atol", [
    ("local", None, BF16_LOSS_ATOL),
    pytest.param("transformer_engine", None, BF16_LOSS_ATOL, marks=needs_te),
    pytest.param("transformer_engine", "hybrid", FP8_LOSS_ATOL, marks=needs_te),
])
def test_joint_step_on_one_gpu_matches_the_cpu_loss(cpu_reference, impl, fp8, atol):
    workdir, want = cpu_reference
    (got,) = run_on_gpu(_gpu_run, world_size=1, args=(str(workdir), impl, fp8), timeout=600)
    print(f"{impl} fp8={fp8}: gpu {got} vs cpu {want}")
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= atol, (step, g, w)


def _te_local_round_trip(workdir):
    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.models import build_gpt_model
    from megatron_wmss.models.checkpoint import load_model_checkpoint, save_model_checkpoint

    cfg = dataclasses.replace(_model_config(), params_dtype="bfloat16")
    te = build_gpt_model(cfg, ParallelConfig(), use_te=True)
    save_model_checkpoint(te, f"{workdir}/te")
    local = build_gpt_model(cfg, ParallelConfig(), use_te=False)
    load_model_checkpoint(local, f"{workdir}/te")
    save_model_checkpoint(local, f"{workdir}/local")
    te_again = build_gpt_model(cfg, ParallelConfig(), use_te=True)
    load_model_checkpoint(te_again, f"{workdir}/local")

    def by_key(model):
        return {v.key: v.data.detach().cpu() for k, v in model.sharded_state_dict().items()
                if hasattr(v, "key") and not k.endswith("_extra_state")}

    a, b, c = by_key(te), by_key(local), by_key(te_again)
    tokens, _ = _global_batches()[0]
    tokens = tokens[:2].cuda()
    positions = torch.arange(SEQ, device="cuda").expand_as(tokens)
    with torch.no_grad():
        logits = [m(tokens, positions, None).float().cpu() for m in (te, local)]
    return (sorted(a) == sorted(b) == sorted(c),
            all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a),
            float((logits[0] - logits[1]).abs().max()), float(logits[0].abs().max()))


@needs_te
def test_te_checkpoint_loads_into_the_local_spec_and_back(tmp_path):
    same_keys, same_values, logit_diff, logit_scale = run_on_gpu(
        _te_local_round_trip, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    assert same_keys and same_values
    # Same weights, two kernels in bf16: the logits agree to bf16 precision.
    assert logit_diff <= 0.05 * max(logit_scale, 1.0), (logit_diff, logit_scale)
