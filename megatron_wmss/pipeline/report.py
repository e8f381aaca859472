"""The report of a ``wmss run``: ``RUN_DIR/report/report.{md,json}`` and PNG plots.

Every number is read from the stage outputs of this run (completion markers, metrics.jsonl,
selection summaries): nothing is recomputed or timed here, so a run that was killed and
resumed writes the same report as one that ran straight through (the stages' wall clock goes
to cost.md / cost.json: :mod:`megatron_wmss.pipeline.cost`). The verdicts' 95% intervals
come from the per-problem results each evaluation wrote (``predictions/<task>.jsonl``), by the
paired bootstrap of :mod:`megatron_wmss.evaluation.stats` with a seeded RNG.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from megatron_wmss.pipeline.config import CONTROLS, PipelineConfig
from megatron_wmss.pipeline.plots import COLORS, Panel, write_lines_png
from megatron_wmss.pipeline.stages import plan_stages, read_marker
from megatron_wmss.platform.files import write_file_atomic

__all__ = ["build_report", "render_markdown", "write_report"]

ROW_NAMES = {"base": "base (M0)", "sft_1epoch": "SFT 1 epoch (M1)",
             "sft_baseline": "SFT, same epochs", "wmss": "WMSS"}
# (metrics key, panel title, y label with unit, the range the quantity can take)
_DIAGNOSTICS = (
    ("margin", "logit margin of the target", r"$z_y - \mathrm{mean}_{k \neq y}\, z_k$ (logits)",
     (None, None)),
    ("nontarget", "non-target mass", "1 − P(y) (probability)", (0.0, 1.0)),
    ("entropy", "predictive entropy", "entropy (nats per token)", (0.0, None)))


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
    eval_dirs: dict[tuple[str, str], Path] = {}   # (row label, seed) -> its `wmss eval` run
    backends: dict[str, set] = {}  # backend -> why it was chosen
    for stage in stages:
        if stage.kind != "eval":
            continue
        marker = read_marker(config, stage)
        if marker is None:
            raise FileNotFoundError(f"stage {stage.id} has not finished")
        scores = marker["result"]["scores"]
        row = rows.setdefault(stage.label, {"per_seed": {}, "tasks": sorted(scores)})
        key = "shared" if stage.id.startswith("shared/") else str(stage.seed)
        eval_dirs[stage.label, key] = stage.directory(config.root) / "eval"
        row["per_seed"][key] = {"scores": scores,
                                "mean_over_tasks": statistics.fmean(scores.values()),
                                "n": marker["result"]["n"],
                                "backend": marker["result"].get("backend")}
        backends.setdefault(marker["result"].get("backend") or "unrecorded", set()).add(
            marker["result"].get("backend_reason") or "")
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
    verdict = _verdict(rows, epochs, eval_dirs)
    return {"config": config.to_dict(), "tasks": list(config.eval.tasks), "rows": rows,
            "eval_backends": {b: sorted(r for r in why if r) for b, why in backends.items()},
            "training": training, "verdict": verdict,
            "controls": {c: CONTROLS[c] for c in config.controls}}


def _verdict(rows: dict, epochs: int, eval_dirs: dict) -> dict:
    """WMSS against the SFT baseline and against the temperature control: per-seed differences,
    a 95% interval (megatron_wmss.evaluation.stats) and the verdict it gives."""
    out: dict = {}
    for key, other, name in (("wmss_vs_sft", "sft_baseline", f"SFT for {epochs} epochs"),
                             ("wmss_vs_temperature", "temperature",
                              "the temperature control CE(λ·z_strong)")):
        if "wmss" in rows and other in rows:
            out[key] = _compare(rows, eval_dirs, "wmss", other, name)
    return out


def _compare(rows: dict, eval_dirs: dict, a: str, b: str, name: str) -> dict:
    """Row ``a`` − row ``b``, paired on seed and problem (doc id); a seed-only bootstrap when
    a seed's per-problem results are missing."""
    from megatron_wmss.evaluation.report import load_problem_scores
    from megatron_wmss.evaluation.stats import compare_problems, compare_seeds, paired_differences

    seeds = [s for s in rows[a]["per_seed"] if s in rows[b]["per_seed"]]
    differences, missing = {}, []
    for seed in seeds:
        per_task = []
        for task in rows[a]["tasks"]:
            scores = [load_problem_scores(eval_dirs[label, seed], task) for label in (a, b)]
            if None in scores:
                missing.append(f"{task} of seed {seed}")
                continue
            per_task.append(paired_differences(*scores, task=task,
                                               names=(f"{a} seed {seed}", f"{b} seed {seed}")))
        differences[seed] = per_task
    if missing:
        mean = {label: {s: rows[label]["per_seed"][s]["mean_over_tasks"] for s in seeds}
                for label in (a, b)}
        comparison = compare_seeds({s: mean[a][s] - mean[b][s] for s in seeds},
                                   reason=f"no per-problem results for {', '.join(missing)}")
    else:
        comparison = compare_problems(differences)
    c = comparison.to_dict()
    low, high = c["interval"]
    interval = "no interval" if low is None else \
        f"95% interval {100 * low:+.1f} to {100 * high:+.1f}"
    per_seed = ", ".join(f"{100 * v:+.1f}" for v in c["per_seed"].values())
    c["text"] = (f"WMSS against {name}: {c['verdict']}, {100 * c['difference']:+.1f} points, "
                 f"{interval} ({100 * rows[a]['mean']:.1f}% vs {100 * rows[b]['mean']:.1f}% "
                 f"held-out exact match, mean of {len(seeds)} seeds; per seed {per_seed})")
    return c


def _cell(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_markdown(report: dict) -> str:
    seeds = [str(s) for s in report["config"]["seeds"]]
    tasks = report["tasks"]
    lines = ["# wmss run report", "",
             f"Held-out exact match (%), {', '.join(tasks)} (mean over tasks), greedy; "
             f"{len(seeds)} seeds; mean ± std over seeds (n−1). Verdicts: higher or lower "
             "when the 95% interval of the difference excludes 0, else not resolved.", ""]
    lines += _backend_lines(report)
    for item in report["verdict"].values():
        lines += [f"- **{item['text']}**", f"  - interval: {item['method']}."]
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
              "WMSS phase 3: the strong model's), `selection_weights_seed*.png`. What the "
              "method cost (wall clock, WMSS arm against the baseline): `cost.md`.", ""]
    return "\n".join(lines)


def _backend_lines(report: dict) -> list[str]:
    """Which backend scored the rows: one (and why), or a warning naming each one's rows."""
    backends = report.get("eval_backends", {})
    if len(backends) == 1:
        (backend, why), = backends.items()
        return [f"Every row scored by the {backend} backend ({'; '.join(why) or 'as set'}): "
                "one generation setting and stop rule.", ""]
    if not backends:
        return []
    used = []
    for backend in sorted(backends):
        rows = [label for label, row in report["rows"].items()
                if any(v.get("backend") == backend for v in row["per_seed"].values())]
        used.append(f"{backend}: {', '.join(rows) or 'rows from older markers'}")
    return ["**Rows were scored by different backends** (" + "; ".join(used) + "): rerun the "
            "eval stages with one eval.backend before comparing them.", ""]


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
    write_lines_png(out / "loss.png", [Panel("loss (nats per token)", _curves(config, "loss"),
                                             limits=(0.0, None))],
                    title="Training loss: SFT baseline vs WMSS")
    write_lines_png(out / "diagnostics.png",
                    [Panel(ylabel, _curves(config, key), title=title, limits=limits)
                     for key, title, ylabel, limits in _DIAGNOSTICS],
                    title="Saturation diagnostics of the trained model (WMSS phase 3: strong)")
    from megatron_wmss.pipeline.cost import build_cost, render_cost

    cost = build_cost(config)
    write_file_atomic(out / "cost.json", json.dumps(cost, indent=2) + "\n")
    write_file_atomic(out / "cost.md", render_cost(cost))
    for seed in config.seeds:
        weights = config.root / f"seed{seed}" / "select1" / "weights.png"
        if weights.is_file():
            write_file_atomic(out / f"selection_weights_seed{seed}.png", weights.read_bytes())
    return out / "report.md"
