"""``wmss eval report RUN_DIR... --out DIR``: several ``wmss eval`` runs side by side.

Reads each run's ``summary.json`` (what the run itself measured; nothing is recomputed or
typed in) and publishes ``DIR`` atomically with:

- ``report.md``: one row per task (and pass@k), one column per run, and the mean over the
  tasks every run has;
- ``report.json``: ``{"runs": [...], "tasks": [...], "scores": {task: {label: entry}}}`` with
  each run's entry as its summary wrote it (``metric``, ``score`` in [0, 1], ``n``, ...);
- ``report.png``: grouped bars, one group per task, one bar per run.

A run is named by its ``--label`` (default: the model directory's name); repeated names get
``#2``, ``#3``. Scores over different numbers of problems (``--limit``) are flagged, not
hidden.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_wmss.platform.errors import ArgumentParser, UserError, run_command

__all__ = ["build_report", "load_run", "render_chart", "report_main", "write_report"]

_PALETTE = [(70, 110, 180), (220, 120, 40), (80, 160, 80), (190, 60, 60), (130, 90, 170),
            (120, 120, 120), (40, 160, 170), (200, 170, 40)]
MEAN_ROW = "mean"


def load_run(run_dir: str | os.PathLike) -> dict:
    """The ``summary.json`` of a ``wmss eval`` run directory."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a `wmss eval` run directory (no summary.json); pass "
                        "directories written by `wmss eval --out DIR`")
    try:
        summary = json.loads(path.read_text())
        tasks = summary["tasks"]
        for name, entry in tasks.items():
            float(entry["score"]), int(entry["n"]), str(entry["metric"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a summary written by `wmss eval` ({err!r})") from err
    return summary


def _labels(summaries: Sequence[dict]) -> list[str]:
    labels, seen = [], {}
    for summary in summaries:
        base = str(summary.get("label") or "run")
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def build_report(run_dirs: Sequence[str | os.PathLike]) -> dict:
    """The content of ``report.json`` for ``run_dirs`` (in the order given)."""
    if not run_dirs:
        raise UserError("no run directories given; pass one or more `wmss eval --out` DIRs")
    summaries = [load_run(d) for d in run_dirs]
    labels = _labels(summaries)
    tasks: list[str] = []
    for summary in summaries:
        tasks += [t for t in summary["tasks"] if t not in tasks]
    scores = {t: {label: s["tasks"][t] for label, s in zip(labels, summaries) if t in s["tasks"]}
              for t in tasks}
    shared = [t for t in tasks if len(scores[t]) == len(labels)]
    mean = {label: float(np.mean([scores[t][label]["score"] for t in shared]))
            for label in labels} if shared else {}
    runs = [{"label": label, "run_dir": str(d), "model": s.get("model"),
             "backend": s.get("backend"), "preset": s.get("preset"), "limit": s.get("limit")}
            for label, d, s in zip(labels, run_dirs, summaries)]
    return {"runs": runs, "tasks": tasks, "scores": scores,
            "mean": {"tasks": shared, "score": mean}}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def render_markdown(report: dict) -> str:
    labels = [r["label"] for r in report["runs"]]
    lines = ["# Evaluation report", "",
             "Scores in % (exact match for math, pass@1 for code unless marked); n: problems "
             "scored.", "",
             "| task | metric | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    notes = []
    for task in report["tasks"]:
        entries = report["scores"][task]
        metric = next(iter(entries.values()))["metric"]
        ns = sorted({e["n"] for e in entries.values()})
        if len(ns) == 1:
            head, cell = f"{metric}, n={ns[0]}", (lambda e: _percent(e["score"]))
        else:
            head, cell = metric, (lambda e: f"{_percent(e['score'])} (n={e['n']})")
            notes.append(f"{task}: the runs scored different numbers of problems; its columns "
                         "are not comparable")
        lines.append(f"| {task} | {head} | " + " | ".join(
            cell(entries[label]) if label in entries else "–" for label in labels) + " |")
        ks = sorted({k for e in entries.values() for k in e.get("pass_at_k", {})}, key=int)
        for k in ks:
            lines.append(f"| {task} | pass@{k} | " + " | ".join(
                _percent(entries[label]["pass_at_k"][k])
                if label in entries and k in entries[label].get("pass_at_k", {}) else "–"
                for label in labels) + " |")
    mean = report["mean"]
    if len(mean["tasks"]) > 1:
        lines.append(f"| **{MEAN_ROW}** | over {', '.join(mean['tasks'])} | "
                     + " | ".join(_percent(mean["score"][label]) for label in labels) + " |")
    lines += ["", "| run | model | backend | preset | limit |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | `{r['model']}` | {r['backend']} | {r['preset']} | "
              f"{r['limit'] or '–'} |" for r in report["runs"]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_chart(report: dict, *, group_width: int = 0, height: int = 360) -> np.ndarray:
    """Grouped bars as an ``[h, w, 3]`` RGB image: a group per task (and the mean), a bar per
    run with its score in % above it, a legend of the runs' labels."""
    from megatron_wmss.platform.png import (ADVANCE, GLYPH_HEIGHT, INK, canvas, draw_text,
                                            text_width)

    labels = [r["label"] for r in report["runs"]]
    groups = [(t, report["scores"][t]) for t in report["tasks"]]
    if len(report["mean"]["tasks"]) > 1:
        groups.append((MEAN_ROW, {label: {"score": v}
                                  for label, v in report["mean"]["score"].items()}))
    bar = max(3 * ADVANCE + 4, 24)   # wide enough for "100" above it
    group_width = group_width or max(len(labels) * bar + 2 * ADVANCE,
                                     max(text_width(name) for name, _ in groups) + ADVANCE)
    left, top = 50, 40
    plot_bottom = top + height - 80
    width = left + len(groups) * group_width + 20
    width = max(width, left + max(text_width(label) for label in labels) + 60)
    image = canvas(plot_bottom + 30 + len(labels) * (GLYPH_HEIGHT + 8) + 10, width)
    draw_text(image, 10, 10, "score (%) by task")
    span = plot_bottom - top
    for tick in (0, 50, 100):
        y = plot_bottom - span * tick // 100
        image[y, left - 4:left] = INK
        draw_text(image, left - 8 - text_width(str(tick)), y - GLYPH_HEIGHT // 2, str(tick))
    for g, (name, entries) in enumerate(groups):
        x0 = left + g * group_width + ADVANCE
        for i, label in enumerate(labels):
            if label not in entries:
                continue
            score = min(max(float(entries[label]["score"]), 0.0), 1.0)
            h = int(round(span * score))
            xs = x0 + i * bar
            image[plot_bottom - h:plot_bottom, xs:xs + bar - 4] = _PALETTE[i % len(_PALETTE)]
            value = f"{100 * score:.0f}"
            draw_text(image, xs, plot_bottom - h - GLYPH_HEIGHT - 3, value)
        draw_text(image, left + g * group_width + ADVANCE, plot_bottom + 8, name)
    image[plot_bottom, left - 1:width - 10] = INK
    image[top:plot_bottom + 1, left - 1] = INK
    for i, label in enumerate(labels):
        y = plot_bottom + 30 + i * (GLYPH_HEIGHT + 8)
        image[y:y + GLYPH_HEIGHT, left:left + GLYPH_HEIGHT] = _PALETTE[i % len(_PALETTE)]
        draw_text(image, left + GLYPH_HEIGHT + 8, y, label)
    return image


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 overwrite: bool = False) -> dict:
    """Publish ``out`` with report.md, report.json and report.png; returns the report."""
    from megatron_wmss.platform.files import publishing_directory
    from megatron_wmss.platform.png import write_png

    report = build_report(run_dirs)
    with publishing_directory(out, overwrite, tag="report") as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        write_png(tmp / "report.png", render_chart(report))
    return report


def report_main(argv: Sequence[str]) -> int:
    """``wmss eval report RUN_DIR... --out DIR [--overwrite]``."""
    parser = ArgumentParser(
        prog="wmss eval report",
        description="Compare `wmss eval` run directories: a table (report.md, report.json) "
        "and a bar chart (report.png) of every task's score per run.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="directories written by `wmss eval --out`")
    parser.add_argument("--out", required=True, help="report directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(list(argv))

    def body() -> None:
        write_report(args.run_dirs, args.out, args.overwrite)
        print(f"wrote {Path(args.out) / 'report.md'}")

    return run_command(parser.prog, body)
