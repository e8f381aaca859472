"""Line charts of the ``wmss run`` report (``loss.png``, ``diagnostics.png``).

One figure per question; a figure holds one panel per quantity, stacked over a shared x axis
(epochs), one line per series, and a single legend below the panels so it never covers a
curve. Each panel's y axis stays inside the quantity's own range (:attr:`Panel.limits`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_wmss.platform.figures import clamp_ylim, new_figure, rgb, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLORS", "Panel", "Series", "lines_figure", "write_lines_png"]

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (140, 86, 75), (23, 190, 207)]

Series = tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]
"""(legend name, x, y, colour as 0..255 RGB)."""


@dataclass(frozen=True)
class Panel:
    """One quantity: its axes in a figure."""

    ylabel: str
    """The quantity and its unit, e.g. "loss (nats per token)"."""
    series: Sequence[Series]
    """The lines drawn."""
    title: str = ""
    """Above the panel; empty: none."""
    limits: tuple[Optional[float], Optional[float]] = field(default=(None, None))
    """The values the quantity can take (None: unbounded); the y axis never leaves them."""


def lines_figure(panels: Sequence[Panel], *, title: str, xlabel: str = "epoch",
                 width: float = 8.0, panel_height: float = 2.4) -> "Figure":
    """The panels stacked over a shared x axis, titled ``title``; the legend lists every
    named series once, below the panels (outside them: it covers no data)."""
    if not panels:
        raise ValueError("lines_figure: no panels; pass at least one Panel")
    figure = new_figure(width, 1.5 + panel_height * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    handles: dict[str, object] = {}
    for ax, panel in zip(axes, panels):
        for name, xs, ys, color in panel.series:
            if len(xs) == 0:
                continue
            (line,) = ax.plot(xs, ys, color=rgb(color), linewidth=1.6,
                              marker="o" if len(xs) == 1 else None, label=name)
            handles.setdefault(name, line)
        if not any(len(xs) for _, xs, _, _ in panel.series):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                    color="0.5")
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize="medium")
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        clamp_ylim(ax, panel.limits)
    axes[-1].set_xlabel(xlabel)
    figure.suptitle(title, fontsize="large")
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                      ncols=min(len(handles), 4), frameon=False)
    return figure


def write_lines_png(path: str | os.PathLike, panels: Sequence[Panel], *, title: str,
                    **kwargs) -> None:
    """Publish :func:`lines_figure` of ``panels`` as a PNG at ``path`` (atomically)."""
    save_png(lines_figure(panels, title=title, **kwargs), path)
