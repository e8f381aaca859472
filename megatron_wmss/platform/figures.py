"""Figures drawn with matplotlib, off screen, and published atomically as PNG.

Every plot of the project (``pipeline/plots.py``, ``curriculum/figures.py``,
``evaluation/figures.py``) builds a :class:`matplotlib.figure.Figure` with :func:`new_figure`
and writes it with :func:`save_png`. The figure gets its own Agg canvas: no pyplot, no global
backend, no display, so plotting works on a headless node and inside a training process.
matplotlib is imported inside the functions: importing this module (or the CLI) stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_wmss.platform.files import write_file_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DPI", "clamp_ylim", "new_figure", "rgb", "save_png"]

DPI = 120
"""Pixels per inch of the PNGs: an 8 x 4.5 in figure is 960 x 540 pixels."""


def new_figure(width: float = 8.0, height: float = 4.5) -> "Figure":
    """An empty figure of ``width`` x ``height`` inches on an Agg canvas, with constrained
    layout (labels, titles and legends placed outside the axes are never clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: "Figure", path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (a reader never sees half a file)."""
    return write_file_atomic(path, writer=lambda tmp: figure.savefig(tmp, format="png",
                                                                      dpi=figure.dpi))


def clamp_ylim(axes, limits: tuple[Optional[float], Optional[float]]) -> None:
    """Keep the autoscaled y range of ``axes`` inside ``limits`` (the quantity's own range,
    ``None`` for unbounded): the padding around a loss near 0 must not show negative loss."""
    lo, hi = axes.get_ylim()
    if limits[0] is not None:
        lo = max(lo, limits[0])
    if limits[1] is not None:
        hi = min(hi, limits[1])
    if hi > lo:
        axes.set_ylim(lo, hi)


def rgb(color) -> tuple[float, ...]:
    """A matplotlib colour from an ``(r, g, b)`` of 0..255 ints; anything else as given."""
    if isinstance(color, tuple) and len(color) == 3 and all(isinstance(c, int) for c in color):
        return tuple(c / 255 for c in color)
    return color
