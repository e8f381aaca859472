"""Evaluation with lm-evaluation-harness: benchmark tasks, grading, backends, run reports.

The lm-eval task YAMLs live in the repository's top-level ``evaluation/tasks/`` (installed as
package data under ``megatron_wmss/evaluation/tasks/``); :func:`tasks_dir` finds them. Nothing
here imports lm_eval: the package works without the ``eval`` extra.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["tasks_dir"]


def tasks_dir() -> Path:
    """The directory of our lm-eval task YAMLs (``lm-eval --include_path`` / ``TaskManager``).

    The installed package data if it holds YAMLs, else the source checkout's
    ``evaluation/tasks``. FileNotFoundError naming both places when neither does.
    """
    installed = Path(__file__).resolve().parent / "tasks"
    checkout = Path(__file__).resolve().parents[2] / "evaluation" / "tasks"
    for candidate in (installed, checkout):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise FileNotFoundError(f"no lm-eval task YAMLs in {installed} (installed package data) or "
                            f"{checkout} (source checkout); reinstall megatron_wmss "
                            "(pip install '.[eval]') or run from a checkout")
