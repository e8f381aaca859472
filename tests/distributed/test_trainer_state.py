"""The trainer's parts on real gloo ranks: gradient scale, skipped steps, checkpoint crash safety,
the distributed-optimizer resume fix, activation recomputation."""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.testing import run_distributed
from tests.distributed.test_joint_training import GLOBAL_BATCH, SEQ, VOCAB, _global_batches
from tests.naive import naive_mixed_ce

MICRO = 2


def _setup(joint=True, distributed_optimizer=False, recompute="none", seed=1234, lr=1e-2,
           clip_grad=1.0, params_dtype="float32"):
    from megatron.core import parallel_state as ps

    from megatron_wmss.config import MemoryConfig, MixConfig, OptimConfig, ParallelConfig
    from megatron_wmss.training import setup_training
    from tests.distributed.test_joint_training import _model_config

    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(),
                              ps.get_pipeline_model_parallel_world_size())
    cfg = _model_config()
    cfg.params_dtype = params_dtype
    return setup_training(
        cfg, parallel,
        OptimConfig(lr=lr, warmup_fraction=0.0, lr_schedule="constant", clip_grad=clip_grad),
        8, mix=MixConfig(mix_lambda=0.5) if joint else None, seed=seed,
        memory=MemoryConfig(distributed_optimizer=distributed_optimizer, recompute=recompute))


def _rank_batches(step=0):
    """This DP rank's micro-batches of global batch ``step`` (rows split in rank order)."""
    from megatron.core import parallel_state as ps

    tokens, labels = _global_batches()[step]
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = GLOBAL_BATCH // dp
    rows = slice(rank * per, (rank + 1) * per)
    return [{"tokens": tokens[rows][i:i + MICRO], "labels": labels[rows][i:i + MICRO]}
            for i in range(0, per, MICRO)]


def _gradients_vs_naive():
    import torch.distributed as dist

    from megatron_wmss.models import build_gpt_model, JointGPTModel
    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.training.step import causal_attention_mask, forward_backward
    from tests.distributed.test_joint_training import _model_config

    setup = _setup()
    batches = _rank_batches()
    counts = [int((b["labels"] != -100).sum()) for b in batches]
    forward_backward(setup, iter(batches), num_microbatches=len(batches),
                     micro_batch_size=MICRO)
    ours = {name.removeprefix("module."): p.main_grad.clone()
            for name, p in setup.model[0].named_parameters()}

    # Naive: one plain (no DDP, no schedule) copy of the same weights on the whole global
    # batch, loss = sum of per-token mixed CE / number of supervised tokens, autograd.
    naive = JointGPTModel(build_gpt_model(_model_config(), ParallelConfig()),
                          build_gpt_model(_model_config(), ParallelConfig()), 0.5)
    naive.load_state_dict(setup.unwrapped.state_dict())
    tokens, labels = _global_batches()[0]
    positions = torch.arange(SEQ).expand_as(tokens)
    strong, weak = naive(tokens, positions, causal_attention_mask(SEQ, "cpu"))
    per_token = naive_mixed_ce(strong[..., :VOCAB], weak[..., :VOCAB], labels, 0.5)
    (per_token.sum() / (labels != -100).sum()).backward()
    worst = 0.0
    for name, p in naive.named_parameters():
        want, got = p.grad, ours[name]
        worst = max(worst, float(((got - want).abs() - 1e-6 - 1e-5 * want.abs()).max()))
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)
    return worst, all_counts, float(max(p.grad.abs().max() for p in naive.parameters()))


def test_gradients_equal_autograd_of_the_token_mean_loss_across_micro_batches_and_dp():
    for worst, counts, scale in run_distributed(_gradients_vs_naive, world_size=2,
                                                timeout=300):
        # Micro-batches and ranks hold different numbers of supervised tokens, so a
        # per-micro-batch or per-rank mean (or no 1/num_tokens at all) would be visible.
        flat = [c for rank in counts for c in rank]
        assert len(set(flat)) > 1 and len({sum(rank) for rank in counts}) > 1, counts
        # fp32, same weights: summation order only (atol 1e-6 + rtol 1e-5 on each grad).
        assert worst <= 0.0, worst
        assert scale > 1e-3  # not a comparison of zeros


def _skipped_step_changes_nothing():
    from megatron_wmss.training import train_step

    setup = _setup(joint=False)
    params = dict(setup.unwrapped.named_parameters())
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    with torch.no_grad():
        saved = params[name][0, 0].item()
        params[name][0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in params.items()}
    lr_before = setup.optimizer.param_groups[0]["lr"]
    batches = _rank_batches()
    bad = train_step(setup, iter(batches), num_microbatches=len(batches),
                     micro_batch_size=MICRO)
    unchanged = all(torch.equal(torch.nan_to_num(before[k], nan=7.0),
                                torch.nan_to_num(v.detach(), nan=7.0)) for k, v in params.items())
    with torch.no_grad():
        params[name][0, 0] = saved
    good = train_step(setup, iter(batches), num_microbatches=len(batches),
                      micro_batch_size=MICRO)
    moved = not torch.equal(before["embedding.word_embeddings.weight"],
                            params["embedding.word_embeddings.weight"].detach())
    return dict(bad_skipped=bad.skipped, unchanged=unchanged, good_skipped=good.skipped,
                moved=moved, steps=setup.step, lr_unchanged=bad.lr == lr_before == good.lr,
                scheduler_steps=setup.scheduler.num_steps)


def test_a_non_finite_step_is_skipped_without_touching_weights_or_schedule():
    (result,) = run_distributed(_skipped_step_changes_nothing, world_size=1, timeout=300)
    assert result["bad_skipped"] and result["unchanged"]
    assert not result["good_skipped"] and result["moved"]
    # Both iterations count (λ follows them); the LR schedule advanced once, for the update.
    assert result["steps"] == 2 and result["scheduler_steps"] == 1
    assert result["lr_unchanged"]  # constant schedule: the skipped step did not move it


def _crash_in_the_middle_of_a_save(workdir):
    import torch.distributed as dist

    from megatron_wmss.platform import manifest
    from megatron_wmss.training.state import (
        TrainState,
        find_resume_checkpoint,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    from megatron_wmss.training import train_step

    setup = _setup(joint=False)
    batches = _rank_batches()
    train_step(setup, iter(batches), num_microbatches=len(batches), micro_batch_size=MICRO)
    save_training_checkpoint(setup, TrainState(step=1), workdir, keep_last=2)
    real_crc = manifest.file_crc32

    def die_on_rank1(path):
        # Every rank wrote its shards; reading them back for the manifest, one rank fails.
        # (A failure inside megatron's own save is tests/distributed/test_checkpoint_storage.)
        if dist.get_rank() == 1:
            raise OSError("injected: node lost while saving")
        return real_crc(path)

    manifest.file_crc32 = die_on_rank1
    try:
        save_training_checkpoint(setup, TrainState(step=2), workdir, keep_last=2)
        failed = None
    except Exception as err:  # noqa: BLE001 - both ranks must see the failure
        failed = type(err).__name__
    finally:
        manifest.file_crc32 = real_crc
    found = find_resume_checkpoint(workdir)
    fresh = _setup(joint=False, seed=99)
    state = load_training_checkpoint(fresh, found)
    same = all(torch.equal(a, b) for a, b in zip(setup.unwrapped.state_dict().values(),
                                                  fresh.unwrapped.state_dict().values())
               if isinstance(a, torch.Tensor))
    import json
    from pathlib import Path

    latest = json.loads((Path(workdir) / "latest").read_text())["checkpoint"]
    return failed, found.name, latest, state.step, same, sorted(
        p.name for p in Path(workdir).iterdir())


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_and_latest(tmp_path):
    for failed, found, latest, step, same, listing in run_distributed(
            _crash_in_the_middle_of_a_save, world_size=2, args=(str(tmp_path),), timeout=300):
        assert failed is not None  # every rank hears of the failed save
        assert found == latest == "iter_0000001" and step == 1 and same
        assert listing == ["iter_0000001", "latest"]  # nothing half-written left behind


def _distributed_optimizer_resume(workdir, fix):
    import megatron_wmss.platform.distrib_optimizer as fixes
    from megatron_wmss.training import train_step
    from megatron_wmss.training.state import (
        TrainState,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    if not fix:
        fixes._APPLIED = True  # pretend it is installed: megatron-core as shipped
    setup = _setup(distributed_optimizer=True)

    def step(s, i):
        batches = _rank_batches(i % 3)
        return train_step(s, iter(batches), num_microbatches=len(batches),
                          micro_batch_size=MICRO).loss

    try:
        losses = [step(setup, i) for i in range(2)]
        save_training_checkpoint(setup, TrainState(step=2), workdir, keep_last=2)
        losses += [step(setup, i) for i in range(2, 4)]
        resumed = _setup(distributed_optimizer=True, seed=7)
        load_training_checkpoint(resumed, f"{workdir}/iter_0000002")
        return losses[2:], [step(resumed, i) for i in range(2, 4)], None
    except Exception as err:  # noqa: BLE001
        return None, None, f"{type(err).__name__}: {err}"


@pytest.mark.parametrize("fix", [True, False], ids=["with-fix", "megatron-as-shipped"])
def test_distributed_optimizer_resumes_exactly_only_with_the_platform_fix(tmp_path, fix):
    results = run_distributed(_distributed_optimizer_resume, world_size=2,
                              args=(str(tmp_path), fix), timeout=300)
    want, got, error = results[0]
    if fix:
        assert error is None and got == want  # bit-identical continuation at DP=2
    else:  # megatron-core 0.16 without TE/Apex cannot even build the state dict
        assert error is not None or got != want, (want, got)


def _bf16_resume(workdir, distributed_optimizer):
    from megatron_wmss.training import train_step
    from megatron_wmss.training.state import (
        TrainState,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    def setup(seed):
        return _setup(distributed_optimizer=distributed_optimizer, seed=seed,
                      params_dtype="bfloat16")

    def step(s, i):
        batches = _rank_batches(i % 3)
        return train_step(s, iter(batches), num_microbatches=len(batches),
                          micro_batch_size=MICRO).loss

    first = setup(1234)
    dtypes = {str(p.dtype) for p in first.unwrapped.parameters()}
    losses = [step(first, i) for i in range(2)]
    save_training_checkpoint(first, TrainState(step=2), workdir, keep_last=2)
    losses += [step(first, i) for i in range(2, 4)]
    resumed = setup(7)
    load_training_checkpoint(resumed, f"{workdir}/iter_0000002")
    return dtypes, losses[2:], [step(resumed, i) for i in range(2, 4)]


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "distopt"])
def test_a_bf16_joint_run_at_tp2_saves_and_resumes_exactly(tmp_path, distributed_optimizer):
    # megatron's bf16 optimizer (without the distributed one) maps its state to the model's
    # parameters assuming all of them are half precision, as Megatron-LM's Float16Module
    # makes them: torch's norms built in fp32 made every save fail ("Param id ... does not
    # match any model sharded param"), found by bench/rehearsal.py.
    for dtypes, want, got in run_distributed(_bf16_resume, world_size=2, tp=2,
                                             args=(str(tmp_path), distributed_optimizer),
                                             timeout=300):
        assert dtypes == {"torch.bfloat16"}
        assert got == want  # bit-identical continuation


def _recompute_losses():
    from megatron_wmss.training import train_step

    out = {}
    for mode in ("none", "selective", "full"):
        setup = _setup(recompute=mode)
        losses, norms = [], []
        for i in range(2):
            batches = _rank_batches(i)
            m = train_step(setup, iter(batches), num_microbatches=len(batches),
                           micro_batch_size=MICRO)
            losses.append(m.loss)
            norms.append(m.grad_norm)
        out[mode] = (losses, norms)
    return out


def test_activation_recomputation_changes_no_number():
    (out,) = run_distributed(_recompute_losses, world_size=1, timeout=300)
    for mode in ("selective", "full"):
        # Recomputing re-runs the same fp32 kernels on the same inputs: identical results.
        assert out[mode] == out["none"], mode


def _update_norm_vs_weights(distributed_optimizer):
    """The strong model's logged update and weight norms against its own weights' change,
    summed by hand over the ranks that hold different parts of it; and the weak model's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_wmss.training import train_step

    setup = _setup(distributed_optimizer=distributed_optimizer)
    micro = GLOBAL_BATCH // MICRO // ps.get_data_parallel_world_size()
    plain = train_step(setup, iter(_rank_batches(0)), num_microbatches=micro,
                       micro_batch_size=MICRO, seq_length=SEQ)
    tied_copy = ps.get_pipeline_model_parallel_world_size() > 1 and \
        not ps.is_pipeline_first_stage()  # the last stage's copy of the tied embedding
    models = {name: {n: p for n, p in getattr(setup.unwrapped, name).named_parameters()
                     if not (tied_copy and n == "output_layer.weight")}
              for name in ("strong", "weak")}
    before = {name: {n: p.detach().clone() for n, p in params.items()}
              for name, params in models.items()}
    measured = train_step(setup, iter(_rank_batches(1)), num_microbatches=micro,
                          micro_batch_size=MICRO, seq_length=SEQ, update_norm=True)
    # Sums of squares: a tensor-parallel shard counts on its own rank, a replicated weight on
    # tensor-parallel rank 0 only; pipeline stages hold disjoint layers. Every data-parallel
    # rank holds the whole (gathered) model, so no sum over them.
    sums = torch.zeros(3, dtype=torch.float64)
    for row, name in enumerate(("strong", "weak")):
        for n, p in models[name].items():
            if getattr(p, "tensor_model_parallel", False) or \
                    ps.get_tensor_model_parallel_rank() == 0:
                new = p.detach().double()
                sums[row] += (new - before[name][n].double()).square().sum()
                if name == "strong":
                    sums[2] += new.square().sum()
    dist.all_reduce(sums, group=ps.get_tensor_model_parallel_group())
    dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    strong, weak, param = sums.sqrt().tolist()
    return plain.update_norms, measured.update_norms, strong, weak, param


@pytest.mark.parametrize("layout", [
    "dp2-distopt",  # main parameters sharded over the data-parallel ranks
    # Tensor-parallel shards beside replicated weights; stages, and the last stage's copy of
    # the tied embedding (counted once). ~12 s each: with the slow tests.
    pytest.param("tp2", marks=pytest.mark.slow), pytest.param("pp2", marks=pytest.mark.slow)])
def test_the_logged_update_norm_is_how_far_the_strong_weights_moved(layout):
    sizes = {"dp2-distopt": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}[layout]
    for plain, got, strong, weak, param in run_distributed(
            _update_norm_vs_weights, world_size=2, args=(layout == "dp2-distopt",),
            timeout=300, **sizes):
        assert plain == {}  # measured only when asked (the trainer asks at log steps)
        # fp32 weights, the same numbers summed in another order (fp64 here): 1e-5 relative.
        # The weak model moves about as far (checked), so a norm that took it in, or counted
        # a shard or a stage twice or not at all, would be off by far more than that.
        assert weak > 0.3 * strong
        assert got["update_norm/strong"] == pytest.approx(strong, rel=1e-5)
        assert got["param_norm/strong"] == pytest.approx(param, rel=1e-5)
        assert got["update_ratio/strong"] == pytest.approx(strong / param, rel=1e-5)
        # Adam at lr 1e-2 moves each coordinate by up to ~lr: a visible, non-zero update.
        assert 1e-4 < got["update_ratio/strong"] < 1.0
