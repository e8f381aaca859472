"""``wmss eval report RUN_DIR... --out DIR [--baseline RUN_DIR]``: ``wmss eval`` runs side by
side, and with ``--baseline`` each run's difference to the baseline with a 95% interval.

Reads each run's ``summary.json`` (what the run itself measured; nothing is recomputed or
typed in) and publishes ``DIR`` atomically with:

- ``report.md``: one row per task (and pass@k), one column per run, and the mean over the
  tasks every run has;
- ``report.json``: ``{"runs": [...], "tasks": [...], "scores": {task: {label: entry}}}`` with
  each run's entry as its summary wrote it (``metric``, ``score`` in [0, 1], ``n``, ...);
  with ``--baseline`` also ``"baseline"`` (its label) and ``"comparisons"``: ``{task: {label:
  {difference, interval, level, method, n_resamples, verdict, n_problems}}}``, run − baseline
  by the paired bootstrap over problems of :mod:`megatron_wmss.evaluation.stats`, paired on
  the doc ids of ``predictions/<task>.jsonl`` (a task whose doc ids differ is an error);
- ``report.png``: grouped bars, one group per task, one bar per run
  (:mod:`megatron_wmss.evaluation.figures`).

A run is named by its ``--label`` (default: the model directory's name); repeated names get
``#2``, ``#3``. Scores over different numbers of problems (``--limit``) are flagged, not
hidden.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_wmss.evaluation.figures import MEAN_ROW
from megatron_wmss.platform.errors import ArgumentParser, UserError, run_command

__all__ = ["build_report", "load_problem_scores", "load_run", "report_main", "write_report"]


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


def load_problem_scores(run_dir: str | os.PathLike, task: str) -> Optional[dict[int, float]]:
    """``{doc_id: 1.0 or 0.0}`` of one task of a ``wmss eval`` run: the ``correct`` of each row
    of ``predictions/<task>.jsonl`` (the first sample's, which the task's score averages).
    None when the run has no such file; UserError naming the line of a malformed row."""
    path = Path(run_dir) / "predictions" / f"{task}.jsonl"
    if not path.is_file():
        return None
    scores: dict[int, float] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            doc_id, correct = row["doc_id"], row["correct"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} line {lineno}: not a predictions row of `wmss eval` "
                            f"(doc_id and correct; {err!r})") from None
        if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id in scores:
            raise UserError(f"{path} line {lineno}: doc_id {doc_id!r} is not an integer or "
                            "appears twice")
        scores[doc_id] = float(correct)
    return scores


def _comparisons(run_dirs: Sequence, summaries: Sequence[dict], labels: list[str],
                 tasks: list[str], baseline: int) -> dict:
    """``{task: {label: comparison}}``: every other run minus the baseline, per task both have."""
    from megatron_wmss.evaluation.stats import compare_problems, paired_differences

    out: dict = {}
    base_label = labels[baseline]
    for task in tasks:
        others = [i for i, s in enumerate(summaries) if i != baseline and task in s["tasks"]]
        if task not in summaries[baseline]["tasks"] or not others:
            continue
        base = _problem_scores(run_dirs[baseline], base_label, task)
        for i in others:
            other = _problem_scores(run_dirs[i], labels[i], task)
            d = paired_differences(other, base, task=task, names=(labels[i], base_label))
            entry = compare_problems({"all": [d]}).to_dict()
            del entry["per_seed"]  # one unseeded pair: the difference itself
            out.setdefault(task, {})[labels[i]] = entry
    return out


def _problem_scores(run_dir, label: str, task: str) -> dict[int, float]:
    scores = load_problem_scores(run_dir, task)
    if scores is None:
        raise UserError(f"task {task}: run {label} ({run_dir}) has no predictions/{task}.jsonl "
                        "(per-problem results), which --baseline needs; rerun `wmss eval`")
    return scores


def _labels(summaries: Sequence[dict]) -> list[str]:
    labels, seen = [], {}
    for summary in summaries:
        base = str(summary.get("label") or "run")
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def build_report(run_dirs: Sequence[str | os.PathLike],
                 baseline: Optional[str | os.PathLike] = None) -> dict:
    """The content of ``report.json`` for ``run_dirs`` (in the order given). ``baseline``: one
    of them, or another run directory (then reported first), that every run is compared with."""
    if not run_dirs:
        raise UserError("no run directories given; pass one or more `wmss eval --out` DIRs")
    run_dirs = list(run_dirs)
    base_index = None
    if baseline is not None:
        same = [i for i, d in enumerate(run_dirs) if Path(d).resolve() == Path(baseline).resolve()]
        if not same:
            run_dirs.insert(0, baseline)
        base_index = same[0] if same else 0
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
    report = {"runs": runs, "tasks": tasks, "scores": scores,
              "mean": {"tasks": shared, "score": mean}}
    if base_index is not None:
        report["baseline"] = labels[base_index]
        report["comparisons"] = _comparisons(run_dirs, summaries, labels, tasks, base_index)
    return report


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
    if "baseline" in report:
        lines += _comparison_lines(report)
    lines += ["", "| run | model | backend | preset | limit |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | `{r['model']}` | {r['backend']} | {r['preset']} | "
              f"{r['limit'] or '–'} |" for r in report["runs"]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _points(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def _comparison_lines(report: dict) -> list[str]:
    """The table of differences to the baseline, and the method once."""
    lines = ["", f"Run − baseline **{report['baseline']}**, in points, with its 95% interval "
             "and the verdict the interval gives:", "",
             "| task | run | difference | 95% interval | verdict |", "|---|---|---|---|---|"]
    methods: list[str] = []
    for task, entries in report["comparisons"].items():
        for label, c in entries.items():
            low, high = c["interval"]
            lines.append(f"| {task} | {label} | {_points(c['difference'])} | "
                         f"{_points(low)} to {_points(high)} | {c['verdict']} |")
            methods += [c["method"]] if c["method"] not in methods else []
    if not methods:
        return lines[:2] + [f"No other run has a task of the baseline {report['baseline']}."]
    return lines + [""] + [f"Interval: {m}." for m in methods]


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 overwrite: bool = False, baseline: Optional[str | os.PathLike] = None) -> dict:
    """Publish ``out`` with report.md, report.json and report.png; returns the report."""
    from megatron_wmss.evaluation.figures import write_scores_png
    from megatron_wmss.platform.files import publishing_directory

    report = build_report(run_dirs, baseline)
    with publishing_directory(out, overwrite, tag="report") as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        write_scores_png(tmp / "report.png", report)
    return report


def report_main(argv: Sequence[str]) -> int:
    """``wmss eval report RUN_DIR... --out DIR [--baseline RUN_DIR] [--overwrite]``."""
    parser = ArgumentParser(
        prog="wmss eval report",
        description="Compare `wmss eval` run directories: a table (report.md, report.json) "
        "and a bar chart (report.png) of every task's score per run.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="directories written by `wmss eval --out`")
    parser.add_argument("--out", required=True, help="report directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--baseline", default=None, metavar="RUN_DIR",
                        help="compare every run with this one (one of RUN_DIR, or another): "
                        "per task, the difference and its 95%% interval (paired bootstrap over "
                        "problems, paired on doc ids) and the verdict it gives")
    args = parser.parse_args(list(argv))

    def body() -> None:
        write_report(args.run_dirs, args.out, args.overwrite, args.baseline)
        print(f"wrote {Path(args.out) / 'report.md'}")

    return run_command(parser.prog, body)
