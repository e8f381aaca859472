"""Histograms as a PNG (:mod:`megatron_wmss.platform.png`: no plotting library needed).

Each panel is one histogram: bars, axes, a title, the x range and the largest bin count.
Enough to see the shape of a weight distribution in a file browser; the exact numbers are in
summary.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_wmss.platform.png import GLYPH_HEIGHT, INK, canvas, draw_text, format_number, \
    text_width, write_png

__all__ = ["render_histograms", "write_histograms_png"]

_BAR, _MARK = (70, 110, 180), (200, 60, 60)


def _panel(title: str, values: np.ndarray, width: int, height: int, bins: int) -> np.ndarray:
    image = canvas(height, width)
    left, right, top, bottom = 70, width - 20, 30, height - 30   # the plot area
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    counts, edges = np.histogram(values, bins=bins)  # empty values: zeros over [0, 1]
    peak = max(int(counts.max()), 1)
    span = right - left
    for b, count in enumerate(counts):
        x0 = left + (b * span) // bins
        x1 = max(left + ((b + 1) * span) // bins - 1, x0 + 1)
        bar = int(round((bottom - top) * count / peak))
        if bar:
            image[bottom - bar:bottom, x0:x1] = _BAR
    lo, hi = float(edges[0]), float(edges[-1])
    if lo < 0 < hi:  # where ΔH changes sign
        x = left + int(round(span * (0 - lo) / (hi - lo)))
        image[top:bottom, x:x + 1] = _MARK
    image[bottom, left - 1:right + 1] = INK
    image[top:bottom + 1, left - 1] = INK
    draw_text(image, 10, 8, title)
    draw_text(image, 8, top, format_number(peak))
    draw_text(image, 8, bottom - GLYPH_HEIGHT, "0")
    draw_text(image, left - 10, bottom + 8, format_number(lo))
    high = format_number(hi)
    draw_text(image, right - text_width(high), bottom + 8, high)
    return image


def render_histograms(panels: Sequence[tuple[str, np.ndarray]], *, width: int = 720,
                      panel_height: int = 300, bins: int = 40) -> np.ndarray:
    """[h, w, 3] uint8 RGB image: one histogram of ``values`` per ``(title, values)``, stacked."""
    return np.concatenate([_panel(title, values, width, panel_height, bins)
                           for title, values in panels], axis=0)


def write_histograms_png(path: str, panels: Sequence[tuple[str, np.ndarray]], **kwargs) -> None:
    """Write :func:`render_histograms` of ``panels`` as an 8-bit RGB PNG at ``path``."""
    write_png(path, render_histograms(panels, **kwargs))
