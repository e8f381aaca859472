"""A :class:`~megatron_wmss.plan.planner.Plan` as a table for people and as JSON for tools.

JSON (``plan_to_dict``): ``world_size``, ``target``, ``gpu_memory_bytes``, ``model`` (the
ModelConfig and its parameter count), ``samples``; ``stages``: per memory column its
``layout`` (tp, pp, dp, sequence_parallel), ``settings``, ``ranks`` (per pipeline stage:
``parameters``, ``trainable``, ``components`` in bytes, ``total``), ``peak_bytes`` and
``verdict``; ``phases``: samples, epochs, micro-batches, optimizer steps and tokens per stage
of the run; ``formulas``; ``notes``; ``cost`` (run configs: the predicted WMSS / SFT cost
ratio and the active fraction it assumes).
"""

from __future__ import annotations

import dataclasses

from megatron_wmss.plan.counts import stage_parameters
from megatron_wmss.plan.planner import Plan

__all__ = ["FORMULAS", "format_plan", "plan_to_dict"]

#: How each component is computed (the module docstrings hold the term-by-term counts).
FORMULAS = {
    "parameters": "exact per-rank counts from the ModelConfig (plan/counts.py), checked "
                  "against the built model's numel",
    "weights": "e·P (e = 2 bf16, 4 fp32; P = parameters of every model on the rank)",
    "gradient_buffers": "4·P_trained (megatron DDP, fp32 main_grad buffer)",
    "optimizer_state": "12·P_trained/DP' bf16 (fp32 main + Adam m, v) or 8·P_trained/DP' "
                       "fp32; DP' = DP with the distributed optimizer, else 1",
    "activations": "Korthikanti et al. 2022 (arXiv 2205.05198) method, recounted for RMSNorm/"
                   "SwiGLU/GQA/RoPE: per layer and micro-batch, by recompute mode and sequence "
                   "parallelism (plan/activations.py), x layers x models trained x micro-batches "
                   "in flight (1F1B: PP - stage)",
    "recomputed_layer": "full recompute: one layer's whole set again plus its gradients",
    "loss": "last stage: final norms + what the loss saves + its workspace: unfused "
            "fp32 exp [T, V/t] + the models' logits or their gradients; chunked: per trained "
            "model an fp32 [V/t, h] weight gradient (+ bf16 cast) and a [T, h] hidden "
            "gradient, + a 4 MiB tile (plan/activations.py)",
    "optimizer_step": "CPU torch AdamW: 2 fp32 temporaries of the largest parameter, or gloo's "
                      "copy of the param buffer (e·P_trained, distributed optimizer); GPU fused "
                      "Adam, NCCL: 0; + 4·P_strong/DP' update-norm copy "
                      "(trainer.log_update_norm)",
    "gradient_reduce": "CPU, distributed optimizer: gloo's reduce-scatter copies the fp32 "
                       "gradient buffer (4·P_trained); NCCL: 0",
    "kv_cache": "2·L·(prompt + new tokens)·batch·(g/t)·d·e (megatron StaticInferenceContext)",
    "entropy_chunk": "entropy pass, last stage: the final hidden states and the supervised "
                     "positions' copy (2·T·e·h at most) + one chunk's logits [c, V/t] in e "
                     "(c·V/t <= 2^24; no [T, V/t] logits)",
    "checkpoint_load": "CPU: torch's distributed checkpoint reads each stored chunk whole "
                       "before copying it into the parameter: the largest chunk of the base "
                       "(its metadata) or of the run's checkpoints (e·V/t·h at their TP); on "
                       "a GPU that copy is host memory, 0",
    "total": "weights + gradient_buffers + optimizer_state + max(activations + max(loss, "
             "recomputed_layer), optimizer_step, gradient_reduce, checkpoint_load); entropy: "
             "weights + max(activations, entropy_chunk, checkpoint_load); eval: weights + "
             "max(kv_cache + activations, checkpoint_load)",
}

_ROWS = (("weights", "weights"), ("gradient_buffers", "gradient buffers"),
         ("optimizer_state", "optimizer state"), ("activations", "activations"),
         ("recomputed_layer", "recomputed layer"), ("loss", "loss"),
         ("optimizer_step", "optimizer step (*)"), ("gradient_reduce", "gradient reduce (*)"),
         ("entropy_chunk", "entropy chunk"), ("kv_cache", "KV cache"),
         ("checkpoint_load", "checkpoint load (*)"))


def plan_to_dict(plan: Plan) -> dict:
    """The plan as plain JSON-able data (bytes and element counts as ints)."""
    stages = []
    for stage in plan.stages:
        stages.append({
            "name": stage.name, "kind": stage.kind,
            "layout": dataclasses.asdict(stage.layout), "settings": stage.settings,
            "ranks": [{"pipeline_stage": r.pipeline_stage, "parameters": r.parameters,
                       "trainable": r.trainable, "components": dict(r.components),
                       "total": r.total} for r in stage.ranks],
            "peak_bytes": stage.peak, "peak_fraction": stage.peak / plan.gpu_memory,
            "verdict": plan.verdict(stage)})
    return {
        "config": plan.config, "kind": plan.kind, "world_size": plan.world_size,
        "target": plan.target, "gpu_memory_bytes": plan.gpu_memory,
        "model": {**dataclasses.asdict(plan.model),
                  "parameters": stage_parameters(plan.model, 1, 1, 0).total},
        "samples": plan.samples, "samples_source": plan.samples_source,
        "stages": stages, "phases": [dataclasses.asdict(p) for p in plan.phases],
        "formulas": FORMULAS, "notes": plan.notes, "cost": plan.cost,
    }


def _size(n: int, unit: int) -> str:
    return f"{n / unit:.2f}"


def _count(n) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _describe(settings: dict) -> str:
    """One line of what a stage's memory depends on."""
    s = settings
    parts = [s["params_dtype"], "Transformer Engine layers" if s["layers"] == "te"
             else "local layers"]
    if "models" in s:
        parts.append("strong + weak (weak frozen)" if s["freeze_weak"] else
                     "strong + weak" if s["models"] == 2 else "one model")
    if "seq_length" in s:
        parts.append(f"micro-batch {s['micro_batch_size']} x {s['seq_length']} tokens")
    if "microbatches_per_step" in s:
        parts += [f"{s['microbatches_per_step']} micro-batches per step and rank",
                  f"recompute {s['recompute']}", f"{s['cross_entropy']} loss",
                  "distributed optimizer" if s["distributed_optimizer"]
                  else "optimizer not sharded"]
        if s["update_norm_copy"]:
            parts.append("update-norm copy")
        if s.get("fp8"):
            parts.append(f"FP8 {s['fp8']}")
    if s.get("forward_only"):
        parts.append("forward only")
    if "generate_batch_size" in s:
        parts.append(f"{s['generate_batch_size']} prompts decoded together, KV cache for "
                     f"{s['prompt_tokens']} prompt + {s['max_new_tokens']} new tokens "
                     f"(at most {s['kv_tokens']})")
    return ", ".join(parts)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def format_plan(plan: Plan) -> str:
    """The human report: memory per rank by stage, the verdicts, the steps, the notes."""
    m = plan.model
    total = stage_parameters(m, 1, 1, 0).total
    ranks = f"{plan.world_size} rank" + ("s" if plan.world_size > 1 else "")
    lines = [f"wmss plan {plan.config}: {plan.kind}, {ranks}, target {plan.target}, "
             f"{plan.gpu_memory / 2**30:.2f} GiB per device",
             f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
             f"heads {m.num_attention_heads}/{m.num_query_groups} kv x {m.head_dim}, vocab "
             f"{m.vocab_size}, {'tied' if m.tie_word_embeddings else 'untied'}, "
             f"{m.params_dtype}: {_count(total)} parameters", ""]
    columns = [(s, r) for s in plan.stages for r in s.ranks]
    unit, unit_name = (2**30, "GiB") if max(r.total for _, r in columns) >= 2**30 \
        else (2**20, "MiB")
    head = [f"memory per rank, {unit_name}"] + [
        s.name if len(s.ranks) == 1 else f"{s.name} pp{r.pipeline_stage}" for s, r in columns]
    rows = [head, ["layout TP x PP x DP"] + [
        f"{s.layout.tp}x{s.layout.pp}x{s.layout.dp}" + (" SP" if s.layout.sequence_parallel
                                                        else "") for s, _ in columns],
        ["parameters (all models)"] + [_count(r.parameters) for _, r in columns]]
    for key, label in _ROWS:
        values = [r.components.get(key) for _, r in columns]
        if any(values):
            rows.append([label] + [_size(v, unit) if v else "-" for v in values])
    rows.append(["total"] + [_size(r.total, unit) for _, r in columns])
    rows.append(["of --gpu-memory"] + [f"{r.total / plan.gpu_memory:.0%}" for _, r in columns])
    rows.append(["verdict"] + [plan.verdict(s) for s, _ in columns])
    lines += _table(rows)
    lines.append("(*) transients not live together with activations (after backward; a "
                 "checkpoint load: before the first forward)")
    lines.append("")
    lines += [f"{stage.name}: {_describe(stage.settings)}" for stage in plan.stages]
    lines += ["", f"data: {_count(plan.samples)} samples ({plan.samples_source})"]
    steps = [["stage", "samples", "epochs", "micro-batches/rank", "optimizer steps",
              "tokens (at most)"]]
    for p in plan.phases:
        micro = "-" if p.microbatches_per_step is None else (
            f"{p.microbatches_per_step}/step" if p.steps is not None or p.stage != "entropy"
            else f"{p.microbatches_per_step} (pass)")
        steps.append([f"{p.name} [{p.stage}]", _count(p.samples), str(p.epochs), micro,
                      "-" if p.steps is None else str(p.steps), _count(p.tokens)])
    lines += _table(steps)
    if plan.cost is not None:
        c = plan.cost
        lines += ["", f"cost: the WMSS arm (phase 1, {c['iterations'] + 1} entropy passes, "
                  f"selection, {c['iterations']} joint round(s) on {c['active_fraction']:.0%} "
                  f"of the data{', weak frozen' if c['freeze_weak'] else ''}, extraction) "
                  f"against the SFT baseline ({c['iterations'] + 1} epochs): "
                  f"{c['ratio']:.2f}x from FLOPs (forward + backward = 3 forwards; the paper "
                  "measured 1.07x); the run's report/cost.md sets the measured ratio beside it"]
    lines += ["", "how:"] + [f"  {k}: {v}" for k, v in FORMULAS.items()]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
