"""Packed rows against one padded row per sample, through the real training step.

Every sample's per-token losses, the global loss and both models' gradients must not depend on
whether the sample shares its row with others (the block-diagonal mask keeps samples apart)
or sits alone in a padded row: at TP 1/2 and PP 1/2, for plain SFT and for joint training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_wmss.testing import run_distributed

VOCAB, SEQ, N_SAMPLES = 256, 16, 12
# Both layouts compute the same sums in a different order (attention over masked-out
# positions adds exact zeros; the loss and gradient sums run over other row groupings).
LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-6  # GRAD_ATOL relative to the largest gradient entry


def _samples():
    gen = np.random.default_rng(3)
    out = []
    for idx in range(N_SAMPLES):
        n = int(gen.integers(3, SEQ // 2 + 3))  # 3..10 tokens
        prompt = int(gen.integers(1, n - 1))
        out.append({"input_ids": gen.integers(1, VOCAB, n).astype(np.int32),
                    "assistant_mask": np.arange(n) >= prompt, "idx": idx})
    return out


def _batches(packed: bool):
    """(micro-batches, micro_batch_size): packed rows one per micro-batch, or every sample in
    its own row of SEQ tokens, two rows per micro-batch."""
    from megatron_wmss.data.collate import collate_sft
    from megatron_wmss.data.packing import collate_packed, pack_by_length

    samples = _samples()
    if packed:
        packs = pack_by_length([len(s["input_ids"]) for s in samples], SEQ)
        return [collate_packed([[samples[i] for i in p]], pad_id=0, length=SEQ)
                for p in packs], 1
    return [collate_sft(samples[i:i + 2], pad_id=0, pad_to_length=SEQ)
            for i in range(0, N_SAMPLES, 2)], 2


def _setup(joint: bool):
    from megatron.core import parallel_state as ps

    from megatron_wmss.config import MixConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_wmss.training import setup_training

    model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                        tie_word_embeddings=False, params_dtype="float32")
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(),
                              ps.get_pipeline_model_parallel_world_size())
    return setup_training(model, parallel, OptimConfig(lr=1e-3), 1,
                          mix=MixConfig(mix_lambda=0.5) if joint else None)


def _per_sample_losses(setup, batches, micro_batch_size):
    """{sample idx: its per-token losses on supervised positions}, from the last stage, by
    the training step's own forward through megatron's schedule (forward only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_wmss.training import step

    def forward_step(iterator, model):
        batch = next(iterator)
        output, _ = step._forward_step(iter([batch]), model, seq_length=SEQ)

        def loss_func(out):
            return out.sum(), torch.tensor(1), {"per_token": out.detach(), "batch": batch}
        return output, loss_func

    if isinstance(setup.unwrapped, step.JointGPTModel):
        setup.unwrapped.set_mix_lambda(0.5)
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=setup.model,
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=micro_batch_size,
            forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    losses = {}
    for report in reports:
        batch, per_token = report["batch"], report["per_token"].cpu()
        segments = batch.get("segment_ids")
        for row in range(per_token.shape[0]):
            if segments is None:
                groups = [(int(batch["idx"][row]), torch.ones(SEQ, dtype=torch.bool))]
            else:
                ids = batch["sample_idx"].tolist()
                groups = [(ids.pop(0), segments[row] == k)
                          for k in range(int(segments[row].max()) + 1)]
            for idx, where in groups:
                supervised = where & (batch["labels"][row] != -100)
                losses[idx] = per_token[row][supervised].tolist()
    return losses


def _loss_and_grads(setup, batches, micro_batch_size):
    from megatron_wmss.training.step import forward_backward

    loss, supervised, _, _ = forward_backward(
        setup, iter(batches), num_microbatches=len(batches),
        micro_batch_size=micro_batch_size, seq_length=SEQ)
    grads = {name: p.main_grad.detach().clone()
             for name, p in setup.unwrapped.named_parameters() if p.requires_grad}
    return loss, supervised, grads


def _rope_follows_position_ids(setup, batches):
    """The rotation each packed token gets is the one of its own position_ids."""
    model = setup.unwrapped.strong if hasattr(setup.unwrapped, "strong") else setup.unwrapped
    seen = []
    handle = model.rotary_pos_emb.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        from megatron_wmss.training import step

        with torch.no_grad():
            step._forward_step(iter(batches[:1]), setup.model[0], seq_length=SEQ)
    finally:
        handle.remove()
    table = model.rotary_pos_emb.get_emb(SEQ)[:, 0, 0, :]
    positions = batches[0]["position_ids"]
    return seen and all(torch.equal(out[:, 0, 0, :], table[positions[0]]) for out in seen)


def _compare(joint: bool):
    from megatron.core import parallel_state as ps

    setup = _setup(joint)
    padded, packed = _batches(False), _batches(True)
    out = {"n_packed_rows": len(packed[0]),
           "losses": (_per_sample_losses(setup, *padded), _per_sample_losses(setup, *packed))}
    loss_pad, sup_pad, grads_pad = _loss_and_grads(setup, *padded)
    loss_pack, sup_pack, grads_pack = _loss_and_grads(setup, *packed)
    scale = max(float(g.abs().max()) for g in grads_pad.values())
    out.update(loss=(loss_pad, loss_pack), supervised=(sup_pad, sup_pack), grad_scale=scale,
               grad_err=max(float((grads_pad[k] - grads_pack[k]).abs().max())
                            for k in grads_pad) / scale)
    if ps.is_pipeline_first_stage():
        out["rope_ok"] = _rope_follows_position_ids(setup, packed[0])
    return out


@pytest.mark.parametrize("joint,tp,pp", [
    (True, 1, 1), (True, 2, 1), (True, 1, 2), (True, 2, 2), (False, 1, 1), (False, 2, 2)])
def test_packed_rows_give_the_padded_losses_and_gradients(tp, pp, joint):
    for rank, result in enumerate(run_distributed(_compare, world_size=tp * pp, tp=tp, pp=pp,
                                                  args=(joint,), timeout=300)):
        assert result["n_packed_rows"] < N_SAMPLES / 1.5  # rows really hold several samples
        (loss_pad, loss_pack), (sup_pad, sup_pack) = result["loss"], result["supervised"]
        assert sup_pack == sup_pad > 0
        assert loss_pack == pytest.approx(loss_pad, rel=LOSS_RTOL), rank
        assert result["grad_scale"] > 0 and result["grad_err"] <= GRAD_ATOL, (rank, result)
        padded, packed = result["losses"]
        if padded is not None:  # last pipeline stage
            assert sorted(packed) == sorted(padded) == list(range(N_SAMPLES))
            for idx in padded:
                assert packed[idx] == pytest.approx(padded[idx], rel=LOSS_RTOL), (rank, idx)
        if "rope_ok" in result:
            assert result["rope_ok"], rank
