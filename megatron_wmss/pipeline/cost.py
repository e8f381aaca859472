"""What the method costs: ``RUN_DIR/report/cost.{md,json}``, the WMSS arm against the SFT baseline.

Each stage marker records the wall-clock seconds of the attempt that completed the stage and
the tokens its model(s) processed (training: every real token of every step; entropy: every
token of every row). The WMSS arm of one seed is what producing its model took: phase 1 (SFT,
one epoch), both entropy passes (M0's is shared by the seeds but counted in each), selection,
joint training and extraction, every round of ``--iterations``; the baseline is SFT for the
same number of epochs. The paper: 4 h 49 min against 4 h 30 min, 1.07x (WMSS.md §7).

Timings differ from run to run, so they live here and not in report.json / report.md, which a
killed and resumed run reproduces exactly. A stage resumed after a kill counts only the attempt
that finished it (the kill's lost work is not in the figure).
"""

from __future__ import annotations

import re
import statistics
from typing import Optional

from megatron_wmss.pipeline.config import PipelineConfig
from megatron_wmss.pipeline.stages import plan_stages, read_marker

__all__ = ["build_cost", "predicted_cost_ratio", "render_cost"]

#: Stage names of the WMSS arm within a seed: phase 1, then each round's stages.
_ARM = re.compile(r"(sft|entropy_m\d+|select\d+|joint\d+|extract\d+)")
_GROUPS = (("phase 1", "sft"), ("entropy", "entropy"), ("selection", "select"),
           ("joint", "joint"), ("extraction", "extract"))


def _costs(config: PipelineConfig) -> dict[str, dict]:
    costs = {}
    for stage in plan_stages(config):
        marker = read_marker(config, stage)
        if marker is not None and "cost" in marker:
            costs[stage.id] = marker["cost"]
    return costs


def predicted_cost_ratio(iterations: int, active_fractions: list[float],
                         freeze_weak: bool = False) -> float:
    """The WMSS arm's cost over the baseline's from FLOPs alone: with F the forward FLOPs per
    token of one model (strong and weak are one architecture) and T the epoch's tokens, an SFT
    epoch costs 3FT (forward and backward), an entropy pass FT, a joint round over the active
    fraction a of the data (3F + 3F)aT (the weak model trained; frozen, it needs its forward
    only: (3F + F)aT); selection and extraction nothing. K rounds: phase 1 + K + 1 entropy
    passes + K joint rounds, against 1 + K SFT epochs. The paper's 56% active set at K = 1:
    (3 + 2 + 6 x 0.56) / 6 = 1.39 (its measured 1.07 suggests its entropy passes cost less
    than a third of an epoch each)."""
    weak = 1.0 if freeze_weak else 3.0
    arm = 3.0 + (iterations + 1) + sum((3.0 + weak) * a for a in active_fractions)
    return arm / (3.0 * (1 + iterations))


def _predicted(config: PipelineConfig) -> tuple[Optional[float], Optional[float]]:
    """The prediction for this run's own active sets (mean over seeds), and their mean
    fraction (what ``wmss plan --active-fraction`` takes to print the same ratio)."""
    mix = (config.joint.get("mix") or {})
    ratios, seen = [], []
    for seed in config.seeds:
        fractions = []
        for t in range(1, config.iterations + 1):
            stage = next((s for s in plan_stages(config) if s.id == f"seed{seed}/select{t}"),
                         None)
            marker = read_marker(config, stage) if stage else None
            if marker is None:
                break
            fractions.append(marker["result"]["fraction_kept"])
        if len(fractions) == config.iterations:
            seen += fractions
            ratios.append(predicted_cost_ratio(config.iterations, fractions,
                                               bool(mix.get("freeze_weak", False))))
    if not ratios:
        return None, None
    return statistics.fmean(ratios), statistics.fmean(seen)


def build_cost(config: PipelineConfig) -> dict:
    """Per seed: seconds and tokens per group of the WMSS arm, the baseline's, their ratio."""
    costs = _costs(config)
    seeds = {}
    for seed in config.seeds:
        prefix = f"seed{seed}/"
        arm = {sid: c for sid, c in costs.items()
               if sid == "shared/entropy_m0" or (sid.startswith(prefix)
                                                 and _ARM.fullmatch(sid[len(prefix):]))}
        baseline = costs.get(f"{prefix}baseline")
        if not arm or baseline is None:
            continue
        groups = {name: sum(c["seconds"] for sid, c in arm.items()
                            if sid.split("/")[1].startswith(key))
                  for name, key in _GROUPS}
        total = sum(c["seconds"] for c in arm.values())
        seeds[str(seed)] = {
            "seconds": groups, "wmss_seconds": total, "baseline_seconds": baseline["seconds"],
            "ratio": total / baseline["seconds"] if baseline["seconds"] > 0 else None,
            "wmss_tokens": sum(c.get("tokens") or 0 for c in arm.values()),
            "baseline_tokens": baseline.get("tokens")}
    ratios = [s["ratio"] for s in seeds.values() if s["ratio"] is not None]
    predicted, fraction = _predicted(config)
    memory = {sid: {"peak_bytes": c["peak_bytes"], "measure": c.get("peak_measure")}
              for sid, c in costs.items() if c.get("peak_bytes")}
    return {"seeds": seeds, "mean_ratio": statistics.fmean(ratios) if ratios else None,
            "predicted_ratio": predicted, "active_fraction": fraction,
            "paper_ratio": (4 * 60 + 49) / (4 * 60 + 30), "peak_memory": memory}


def render_cost(cost: dict) -> str:
    lines = ["# What the method cost", "",
             "Wall-clock seconds of the WMSS arm (phase 1, both entropy passes, selection, joint "
             "training, extraction) against the SFT baseline for the same epochs, per seed. "
             f"The paper: {cost['paper_ratio']:.2f}x (4 h 49 min against 4 h 30 min).", "",
             "| seed | " + " | ".join(name for name, _ in _GROUPS)
             + " | WMSS | baseline | ratio |", "|---|" + "---|" * (len(_GROUPS) + 3)]
    for seed, s in cost["seeds"].items():
        cells = [f"{s['seconds'][name]:.1f}" for name, _ in _GROUPS]
        ratio = "—" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {s['wmss_seconds']:.1f} | "
                     f"{s['baseline_seconds']:.1f} | {ratio} |")
    measured = "—" if cost["mean_ratio"] is None else f"{cost['mean_ratio']:.2f}x"
    predicted = ("not computed" if cost["predicted_ratio"] is None
                 else f"{cost['predicted_ratio']:.2f}x")
    plan = "" if cost.get("active_fraction") is None else (
        f" (`wmss plan CONFIG --active-fraction {cost['active_fraction']:.2f}` prints the "
        "same)")
    lines += ["", f"Measured ratio (mean over seeds): {measured}; `wmss plan`'s prediction from "
              f"FLOPs for this run's active sets: {predicted}{plan} (forward + backward = 3 "
              "forwards; entropy passes forward only; phase 3 two models; what the FLOPs leave "
              "out, such as start-up, tokenization and checkpoints, shows as the "
              "difference).", ""]
    memory = cost.get("peak_memory") or {}
    if memory:
        how = {m["measure"] for m in memory.values()}
        lines += ["Peak memory per rank of each stage, GiB (" + ", ".join(sorted(
            _MEASURES.get(h, str(h)) for h in how)) + "; `wmss plan CONFIG` predicts it):", "",
                  "| stage | largest rank | per rank |", "|---|---|---|"]
        for sid, m in memory.items():
            per = " / ".join(f"{b / 2**30:.2f}" for b in m["peak_bytes"])
            lines.append(f"| {sid} | {max(m['peak_bytes']) / 2**30:.2f} | {per} |")
        lines.append("")
    return "\n".join(lines)


_MEASURES = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated",
             "rss_growth": "growth of the peak RSS over the stage's start"}
