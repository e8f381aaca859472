"""``weights.png`` of ``wmss select``: how the sampling weights spread, and the ΔH behind them.

Two histograms side by side: the weights in units of the uniform weight 1/n (so 1 means
"drawn as often as uniform sampling would") and ΔH = H_strong − H_weak with its sign change
marked. The exact numbers are in summary.json.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from megatron_wmss.platform.figures import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["selection_figure", "write_selection_png"]

_BAR, _MARK = "#4c72b0", "#c44e52"


def selection_figure(weights: np.ndarray, delta_h: np.ndarray, *, formula: str,
                     bins: int = 40) -> "Figure":
    """Histograms of ``weights`` ([n], summing to 1) times n and of ``delta_h`` ([n], nats)."""
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    delta_h = np.asarray(delta_h, dtype=np.float64).reshape(-1)
    n = weights.size
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(8.0, 4.5)
    left, right = figure.subplots(1, 2)

    left.hist(weights * n, bins=bins, color=_BAR)
    left.axvline(1.0, color=_MARK, linestyle="--", linewidth=1.2, label="uniform (1/n)")
    left.set_xlabel("sampling weight × n (1 = uniform)")
    left.set_ylabel("samples")
    left.set_title(f"sampling weights ({formula} formula)", fontsize="medium")

    right.hist(delta_h, bins=bins, color=_BAR)
    below, above = int((delta_h < 0).sum()), int((delta_h > 0).sum())
    # ΔH = 0 is marked only where it lies among the data: stretching the axis to reach it
    # squeezes every bar into a sliver (the title counts the samples on each side anyway).
    if delta_h.size and delta_h.min() <= 0.0 <= delta_h.max():
        right.axvline(0.0, color=_MARK, linestyle=":", linewidth=1.4, label="ΔH = 0")
    right.set_xlabel("ΔH = H_strong − H_weak (nats)")
    right.set_ylabel("samples")
    right.set_title(f"entropy discrepancy: {below} below 0, {above} above", fontsize="medium")

    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        ax.grid(True, axis="y", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
    figure.suptitle(f"WD-DS selection weights, n = {n} samples", fontsize="large")
    figure.legend(loc="outside lower center", ncols=2, frameon=False)  # off the bars
    return figure


def write_selection_png(path: str | os.PathLike, weights: np.ndarray, delta_h: np.ndarray, *,
                        formula: str) -> None:
    """Publish :func:`selection_figure` as a PNG at ``path`` (atomically)."""
    save_png(selection_figure(weights, delta_h, formula=formula), path)
