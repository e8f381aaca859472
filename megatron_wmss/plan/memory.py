"""Bytes per rank of a training step, an entropy pass and an evaluation, by component.

Training (megatron DDP with ``grad_reduce_in_fp32``, megatron's optimizer, as
``training/setup.py`` builds them), for ``P`` parameters on the rank (both models in a joint
run; ``P_t`` the trained ones: a frozen weak model has no gradient or optimizer state), ``e``
bytes per parameter (2 bf16, 4 fp32), ``DP`` the data-parallel size::

    weights            e·P          (the distributed optimizer's param buffer replaces them)
    gradient buffers   4·P_t        (fp32 main_grad buffer, unsharded)
    optimizer state    12·P_t/DP'   (bf16: fp32 main params + Adam m, v)  or  8·P_t/DP'
                                    (fp32: Adam m, v; the params are the main params);
                                    DP' = DP with the distributed optimizer, else 1
    activations        models trained × layers of the stage × micro-batches in flight ×
                       activations.layer_bytes (+ the recomputed layer under full recompute)
    loss               activations.head_bytes + activations.loss_workspace_bytes (last stage)
    optimizer step     transient of the update: torch's per-tensor AdamW (CPU) makes two
                       fp32 temporaries of the largest parameter; the fused Adam of
                       Transformer Engine/Apex (GPU images) none; gloo's all-gather of the
                       updated parameters (CPU, distributed optimizer) copies the whole
                       param buffer (e·P_t; NCCL gathers in place); plus the trainer's
                       update-norm copy of the strong model's main parameters (4·P_s/DP')
                       when trainer.log_update_norm is on
    gradient reduce    gloo's reduce-scatter of the fp32 gradient buffer (CPU, distributed
                       optimizer) copies it whole, 4·P_t, after backward; NCCL: 0
    checkpoint load    CPU: torch's distributed checkpoint reads each stored chunk whole into
                       host memory before copying it into the parameter, so loading holds one
                       more of the largest chunk the checkpoint stores (the embedding's
                       ``V/t·h`` at the TP it was saved at: a checkpoint saved at a lower TP
                       costs more); on a GPU that copy is in host memory, not counted

    total = weights + gradient buffers + optimizer state
            + max(activations + max(loss, recomputed layer), optimizer step, gradient reduce,
                  checkpoint load)

With PP > 1 (non-interleaved 1F1B) stage i holds ``min(PP − i, micro-batches)`` micro-batches
in flight. Padding of megatron's buffers (≤ 64 elements per parameter and the bucket's
alignment to lcm(DP, 128) with the distributed optimizer), the CUDA context, NCCL buffers and
the caching allocator's fragmentation are not counted: the verdict leaves room for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_wmss.config import ModelConfig
from megatron_wmss.plan.activations import (
    Shape,
    forward_working_bytes,
    head_bytes,
    kv_cache_bytes,
    layer_bytes,
    loss_workspace_bytes,
    score_buffer_bytes,
)
from megatron_wmss.plan.counts import stage_parameters

__all__ = ["Layout", "RankMemory", "entropy_memory", "eval_memory", "training_memory"]


@dataclass(frozen=True)
class Layout:
    """Where one stage runs: tensor, pipeline and data parallel sizes."""

    tp: int
    pp: int
    dp: int
    sequence_parallel: bool = False


@dataclass
class RankMemory:
    """One rank (of pipeline stage ``pipeline_stage``): parameters and bytes by component."""

    pipeline_stage: int
    parameters: int
    """Elements of every model's parameters on this rank."""
    trainable: int
    components: dict[str, int] = field(default_factory=dict)
    """Bytes; which ones are live together is :attr:`total`'s formula."""
    total: int = 0


def _e(cfg: ModelConfig) -> int:
    return 4 if cfg.params_dtype == "float32" else 2


def training_memory(cfg: ModelConfig, layout: Layout, *, recompute: str, cross_entropy: str,
                    distributed_optimizer: bool, micro_batch_size: int, seq_length: int,
                    num_microbatches: int, models: int = 1, freeze_weak: bool = False,
                    impl: str = "te", gpu: bool = True, update_norm: bool = False,
                    chunk_tokens: int | None = None, load_bytes: int = 0) -> list[RankMemory]:
    """Per pipeline stage, the memory of one rank of a training step (``models`` 1: SFT,
    2: the joint strong/weak pair). ``gpu``: CUDA's allocations (fused Adam, NCCL in place,
    megatron's attention-score buffer resident) or a CPU process's resident memory (torch's
    AdamW, gloo's copying collectives, the never-written score buffer not resident)."""
    if models not in (1, 2):
        raise ValueError(f"models must be 1 (SFT) or 2 (joint), got {models}")
    trained = models - (1 if freeze_weak and models == 2 else 0)
    e = _e(cfg)
    sh = Shape(cfg, layout.tp, seq_length, micro_batch_size, layout.sequence_parallel, impl)
    shard = layout.dp if distributed_optimizer else 1
    out = []
    for stage in range(layout.pp):
        counts = stage_parameters(cfg, layout.tp, layout.pp, stage)
        P, P_t = models * counts.total, trained * counts.total
        in_flight = min(layout.pp - stage, num_microbatches) if layout.pp > 1 else 1
        per_layer = sum(layer_bytes(sh, recompute).values())
        kept = trained * counts.layers_in_stage * in_flight * per_layer
        kept += score_buffer_bytes(sh) if gpu else 0
        recomputed = 0
        if recompute == "full":  # one layer's full set again, and its gradients in flight
            gradients = 2 * sh.tokens * e * cfg.hidden_size // sh.p
            recomputed = sum(layer_bytes(sh, "none").values()) + gradients
        loss = 0
        if stage == layout.pp - 1:
            loss = (head_bytes(sh, cross_entropy, trained, models, recompute)
                    + loss_workspace_bytes(sh, cross_entropy, models, trained, chunk_tokens,
                                           gpu))
        copying = distributed_optimizer and not gpu  # gloo's gather / reduce-scatter copy
        step = 0 if gpu else max(8 * min(counts.largest, -(-counts.total // shard)),
                                 e * P_t if copying else 0)
        if update_norm:
            step += 4 * (-(-counts.total // shard))
        c = {"weights": e * P, "gradient_buffers": 4 * P_t,
             "optimizer_state": (12 if e == 2 else 8) * -(-P_t // shard),
             "activations": kept, "recomputed_layer": recomputed, "loss": loss,
             "optimizer_step": step, "gradient_reduce": 4 * P_t if copying else 0,
             "checkpoint_load": load_bytes}
        total = c["weights"] + c["gradient_buffers"] + c["optimizer_state"] + max(
            kept + max(loss, recomputed), step, c["gradient_reduce"], load_bytes)
        out.append(RankMemory(stage, P, P_t, c, total))
    return out


def entropy_memory(cfg: ModelConfig, layout: Layout, *, micro_batch_size: int,
                   seq_length: int, impl: str = "te", gpu: bool = True, load_bytes: int = 0
                   ) -> list[RankMemory]:
    """Per pipeline stage, one rank of a forward-only entropy pass: the weights, one layer's
    working set, and on the last stage what the entropy adds to the final hidden states
    (``curriculum/entropy.py``): the supervised positions' hidden states (at most every
    token, ``T·e·h``) and the logits of one chunk of them ``[c, V/t]`` (dtype e, ``c`` =
    ``chunk_tokens``), read in 2 MB fp32 row chunks; the larger of that and the working set,
    or of the checkpoint's load transient (``load_bytes``)."""
    from megatron_wmss.curriculum.entropy import chunk_tokens

    sh = Shape(cfg, layout.tp, seq_length, micro_batch_size, False, impl)
    out = []
    for stage in range(layout.pp):
        P = stage_parameters(cfg, layout.tp, layout.pp, stage).total
        head = 0
        if stage == layout.pp - 1:
            chunk = min(sh.tokens, chunk_tokens(sh.local_vocab))
            head = sh.tokens * sh.e * cfg.hidden_size * 2 + chunk * sh.local_vocab * sh.e
        working = forward_working_bytes(sh) + (score_buffer_bytes(sh) if gpu else 0)
        c = {"weights": _e(cfg) * P, "activations": working, "entropy_chunk": head,
             "checkpoint_load": load_bytes}
        out.append(RankMemory(stage, P, 0, c, c["weights"] + max(working, head, load_bytes)))
    return out


def eval_memory(cfg: ModelConfig, tp: int, *, batch: int, prompt_tokens: int,
                new_tokens: int, impl: str = "te", gpu: bool = True, load_bytes: int = 0
                ) -> RankMemory:
    """One rank of the megatron evaluation backend's batched greedy decoding: the weights, the
    KV cache for ``batch`` rows of ``prompt_tokens + new_tokens`` (capped at the model's
    ``max_position_embeddings``, as the backend truncates prompts), and the prefill's working
    set (last-position logits only)."""
    longest = min(cfg.max_position_embeddings, prompt_tokens + new_tokens)
    prefill = Shape(cfg, tp, min(prompt_tokens, longest), batch, False, impl)
    P = stage_parameters(cfg, tp, 1, 0).total
    c = {"weights": _e(cfg) * P, "kv_cache": kv_cache_bytes(cfg, tp, batch, longest),
         "activations": forward_working_bytes(prefill)
         + (score_buffer_bytes(prefill) if gpu else 0), "checkpoint_load": load_bytes}
    return RankMemory(0, P, 0, c, c["weights"] + max(c["kv_cache"] + c["activations"],
                                                     load_bytes))
