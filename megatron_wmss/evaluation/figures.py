"""``report.png`` of ``wmss eval report``: grouped bars of every task's score per run.

One group per task (and one for the mean over the tasks every run has), one bar per run in
the same colour across groups, its score in % written above it; the legend sits below the
axes. A run without a task has no bar in that group.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from megatron_wmss.platform.figures import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MEAN_ROW", "scores_figure", "write_scores_png"]

MEAN_ROW = "mean"
"""Name of the mean-over-tasks row of the report table and group of its figure (here, below
``report``, which draws this figure, so that imports run one way)."""


def _groups(report: dict) -> list[tuple[str, dict[str, float]]]:
    """(x tick label, {run label: score in [0, 1]}) per group."""
    groups = []
    for task in report["tasks"]:
        entries = report["scores"][task]
        metric = next(iter(entries.values()))["metric"]
        ns = sorted({e["n"] for e in entries.values()})
        count = f"n={ns[0]}" if len(ns) == 1 else "n differs"
        groups.append((f"{task}\n{metric}, {count}",
                       {label: float(e["score"]) for label, e in entries.items()}))
    mean = report["mean"]
    if len(mean["tasks"]) > 1:
        groups.append((f"{MEAN_ROW}\nover {len(mean['tasks'])} tasks", dict(mean["score"])))
    return groups


def scores_figure(report: dict) -> "Figure":
    """Grouped bars of ``report`` (what :func:`megatron_wmss.evaluation.report.build_report`
    returns); bar heights are scores in %."""
    labels = [r["label"] for r in report["runs"]]
    groups = _groups(report)
    figure = new_figure(max(8.0, 2.0 + 0.45 * len(groups) * (len(labels) + 1)), 4.5)
    ax = figure.subplots()
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width
              for g, (_, scores) in enumerate(groups) if label in scores]
        heights = [100 * scores[label] for _, scores in groups if label in scores]
        bars = ax.bar(xs, heights, width * 0.92, label=label, color=f"C{i % 10}")
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.set_ylim(0, 108)  # room for the label above a 100% bar; ticks stop at 100
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("score (%)")
    ax.grid(True, axis="y", color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_title("Score per task and run", fontsize="large")
    figure.legend(loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    return figure


def write_scores_png(path: str | os.PathLike, report: dict) -> None:
    """Publish :func:`scores_figure` of ``report`` as a PNG at ``path`` (atomically)."""
    save_png(scores_figure(report), path)
