"""The report of a ``wmss run``: ``RUN_DIR/report/report.{md,json}`` and PNG plots.

Every number is read from the stage outputs of this run (completion markers, metrics.jsonl,
selection summaries): nothing is recomputed or timed here, so a run that was killed and
resumed writes the same report as one that ran straight through.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Optional

from megatron_wmss.pipeline.config import CONTROLS, PipelineConfig
from megatron_wmss.pipeline.plots import COLORS, write_lines_png
from megatron_wmss.pipeline.stages import plan_stages, read_marker
from megatron_wmss.platform.files import write_file_atomic

__all__ = ["build_report", "render_markdown", "write_report"]

ROW_NAMES = {"base": "base (M0)", "sft_1epoch": "SFT 1 epoch (M1)",
             "sft_baseline": "SFT, same epochs", "wmss": "WMSS"}
_DIAGNOSTICS = (("margin", "logit margin z_y - mean z_k"),
                ("nontarget", "non-target mass 1 - P(y)"), ("entropy", "entropy (nats)"))


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_report(config: PipelineConfig) -> dict:
    """The report as a JSON-able dict (what report.json holds)."""
    stages = plan_stages(config)
    rows: dict[str, dict] = {}
    for stage in stages:
        if stage.kind != "eval":
            continue
        marker = read_marker(config, stage)
        if marker is None:
            raise FileNotFoundError(f"stage {stage.id} has not finished")
        scores = marker["result"]["scores"]
        row = rows.setdefault(stage.label, {"per_seed": {}, "tasks": sorted(scores)})
        key = "shared" if stage.id.startswith("shared/") else str(stage.seed)
        row["per_seed"][key] = {"scores": scores,
                                "mean_over_tasks": statistics.fmean(scores.values()),
                                "n": marker["result"]["n"]}
    for row in rows.values():
        values = [v["mean_over_tasks"] for v in row["per_seed"].values()]
        row["mean"], row["std"] = _mean_std(values)
    epochs = 1 + config.iterations
    training = {}
    for seed in config.seeds:
        s = f"seed{seed}"
        select = read_marker(config, next(st for st in stages if st.id == f"{s}/select1"))
        phase1 = _metrics(config.root / s / "sft" / "metrics.jsonl")
        training[str(seed)] = {
            "phase1_final_loss": phase1[-1]["loss"] if phase1 else None,
            "baseline_final_loss": (_metrics(config.root / s / "baseline" / "metrics.jsonl")
                                    or [{"loss": None}])[-1]["loss"],
            "active_set_fraction": select["result"]["fraction_kept"] if select else None,
            "active_set_unique": select["result"]["unique_kept"] if select else None,
        }
    verdict = _verdict(rows, epochs)
    return {"config": config.to_dict(), "tasks": list(config.eval.tasks), "rows": rows,
            "training": training, "verdict": verdict,
            "controls": {c: CONTROLS[c] for c in config.controls}}


def _verdict(rows: dict, epochs: int) -> dict:
    out: dict = {}
    wmss, sft = rows.get("wmss"), rows.get("sft_baseline")
    if wmss and sft:
        seeds = sorted(set(wmss["per_seed"]) & set(sft["per_seed"]))
        wins = sum(wmss["per_seed"][s]["mean_over_tasks"] > sft["per_seed"][s]["mean_over_tasks"]
                   for s in seeds)
        diff = wmss["mean"] - sft["mean"]
        out["wmss_vs_sft"] = {"difference": diff, "seeds_won": wins, "seeds": len(seeds),
                              "text": f"WMSS {'beats' if diff > 0 else 'does not beat'} SFT for "
                              f"{epochs} epochs: {100 * wmss['mean']:.1f}% vs "
                              f"{100 * sft['mean']:.1f}% held-out exact match (mean of "
                              f"{len(seeds)} seeds, {diff * 100:+.1f} points; WMSS higher in "
                              f"{wins} of {len(seeds)} seeds)"}
    temp = rows.get("temperature")
    if wmss and temp:
        diff = wmss["mean"] - temp["mean"]
        out["wmss_vs_temperature"] = {
            "difference": diff,
            "text": f"the temperature control CE(λ·z_strong) scores {100 * temp['mean']:.1f}% "
                    f"against WMSS's {100 * wmss['mean']:.1f}% ({diff * 100:+.1f} points for the "
                    "weak model)"}
    return out


def _cell(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_markdown(report: dict) -> str:
    seeds = [str(s) for s in report["config"]["seeds"]]
    tasks = report["tasks"]
    lines = ["# wmss run report", "",
             f"Held-out exact match (%), {', '.join(tasks)} (mean over tasks), greedy; "
             f"{len(seeds)} seeds; mean ± std over seeds (n−1).", ""]
    for item in report["verdict"].values():
        lines.append(f"- **{item['text']}**")
    lines += ["", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for label, row in report["rows"].items():
        name = ROW_NAMES.get(label, f"control: {label}")
        if "shared" in row["per_seed"]:
            cells = [_cell(row["per_seed"]["shared"]["mean_over_tasks"])] * len(seeds)
        else:
            cells = [_cell(row["per_seed"].get(s, {}).get("mean_over_tasks")) for s in seeds]
        spread = "" if row["std"] is None else f" ± {100 * row['std']:.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(row['mean'])}{spread} |")
    if report["controls"]:
        lines += ["", "Controls:", ""] + [f"- `{k}`: {v}" for k, v in report["controls"].items()]
    lines += ["", "| seed | phase-1 final train loss | baseline final train loss | "
              "active set (unique, fraction) |", "|---|---|---|---|"]
    for seed, t in report["training"].items():
        fraction = t["active_set_fraction"]
        lines.append(f"| {seed} | {_fmt(t['phase1_final_loss'])} | "
                     f"{_fmt(t['baseline_final_loss'])} | {t['active_set_unique']}, "
                     f"{'—' if fraction is None else f'{100 * fraction:.1f}%'} |")
    lines += ["", "Plots: `loss.png` (training loss, SFT against WMSS), `diagnostics.png` "
              "(logit margin, non-target mass, entropy of the trained model's distribution; "
              "WMSS phase 3: the strong model's), `selection_weights_seed*.png`.", ""]
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


def _curves(config: PipelineConfig, key: str):
    """(name, x in epochs, y) per seed for the SFT baseline and for WMSS (phase 1, then
    each round of phase 3; phase 3's strong-model diagnostics)."""
    out = []
    for k, seed in enumerate(config.seeds):
        s = config.root / f"seed{seed}"
        baseline = _metrics(s / "baseline" / "metrics.jsonl")
        phases = [(_metrics(s / "sft" / "metrics.jsonl"), "model")] + [
            (_metrics(s / f"joint{t}" / "metrics.jsonl"), "strong")
            for t in range(1, config.iterations + 1)]
        epochs = 1 + config.iterations
        out.append((f"SFT S{seed}", *_xy(baseline, "model", key, 0.0, float(epochs)),
                    COLORS[0] if k == 0 else _lighter(COLORS[0], k)))
        xs, ys = [], []
        for p, (rows, prefix) in enumerate(phases):
            x, y = _xy(rows, prefix, key, float(p), 1.0)
            xs += x
            ys += y
        out.append((f"WMSS S{seed}", xs, ys, COLORS[1] if k == 0 else _lighter(COLORS[1], k)))
    return out


def _lighter(color, k: int):
    return tuple(int(c + (255 - c) * min(0.25 * k, 0.6)) for c in color)


def _xy(rows: list[dict], prefix: str, key: str, start: float, span: float):
    if not rows:
        return [], []
    last = max(r["step"] for r in rows)
    xs, ys = [], []
    for r in rows:
        if key == "loss":
            value = r.get("loss")
        elif key == "nontarget":
            value = r.get(f"{prefix}/target_prob")
            value = None if value is None else 1.0 - value
        else:
            value = r.get(f"{prefix}/{key}")
        if value is not None:
            xs.append(start + span * r["step"] / last)
            ys.append(float(value))
    return xs, ys


def write_report(config: PipelineConfig) -> Path:
    """Write RUN_DIR/report/ (rank 0); returns the markdown file's path."""
    report = build_report(config)
    out = config.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_file_atomic(out / "report.md", render_markdown(report))
    write_lines_png(out / "loss.png", [("training loss (nats per token)",
                                        _curves(config, "loss"))])
    write_lines_png(out / "diagnostics.png", [(title, _curves(config, key))
                                              for key, title in _DIAGNOSTICS])
    for seed in config.seeds:
        weights = config.root / f"seed{seed}" / "select1" / "weights.png"
        if weights.is_file():
            shutil.copyfile(weights, out / f"selection_weights_seed{seed}.png")
    return out / "report.md"
