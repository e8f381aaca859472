"""Line charts for the ``wmss run`` report (numpy + the built-in PNG writer, no plotting
library): one panel per quantity, one coloured line per series, a legend, the axis ranges."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_wmss.platform.png import (
    GLYPH_HEIGHT,
    INK,
    canvas,
    draw_text,
    format_number,
    text_width,
    write_png,
)

__all__ = ["COLORS", "render_lines", "write_lines_png"]

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (140, 86, 75), (23, 190, 207)]

Series = tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]


def _segment(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w = image.shape[:2]
    keep = (xs >= 0) & (xs < w - 1) & (ys >= 0) & (ys < h - 1)
    xs, ys = xs[keep], ys[keep]
    image[ys, xs] = color
    image[ys + 1, xs] = color  # two pixels thick


def _panel(title: str, series: Sequence[Series], xlabel: str, width: int, height: int
           ) -> np.ndarray:
    image = canvas(height, width)
    left, right, top, bottom = 80, width - 20, 30, height - 40
    points = [(np.asarray(x, float), np.asarray(y, float)) for _, x, y, _ in series]
    finite = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in points]
    xs = np.concatenate([x for x, _ in finite]) if finite else np.zeros(0)
    ys = np.concatenate([y for _, y in finite]) if finite else np.zeros(0)
    if xs.size == 0:
        xs, ys = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = float(ys.min()), float(ys.max())
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for (_, _, _, color), (x, y) in zip(series, finite):
        for k in range(len(x) - 1):
            _segment(image, *px(x[k], y[k]), *px(x[k + 1], y[k + 1]), color)
        if len(x) == 1:
            _segment(image, *px(x[0], y[0]), *px(x[0], y[0]), color)
    image[bottom, left - 1:right + 1] = INK
    image[top:bottom + 1, left - 1] = INK
    draw_text(image, 10, 8, title)
    draw_text(image, 8, top, format_number(y_hi))
    draw_text(image, 8, bottom - GLYPH_HEIGHT, format_number(y_lo))
    draw_text(image, left, bottom + 8, format_number(x_lo))
    high = format_number(x_hi)
    draw_text(image, right - text_width(high), bottom + 8, high)
    draw_text(image, (left + right - text_width(xlabel)) // 2, bottom + 8, xlabel)
    legend_y = top + 4
    for name, _, _, color in series:
        x0 = right - text_width(name) - 30
        image[legend_y + 3: legend_y + 7, x0: x0 + 20] = color
        draw_text(image, x0 + 24, legend_y, name)
        legend_y += GLYPH_HEIGHT + 6
    return image


def render_lines(panels: Sequence[tuple[str, Sequence[Series]]], *, xlabel: str = "epoch",
                 width: int = 900, height: int = 300) -> np.ndarray:
    """Panels stacked vertically; each is (title, [(name, x, y, rgb), ...])."""
    return np.concatenate([_panel(title, series, xlabel, width, height)
                           for title, series in panels], axis=0)


def write_lines_png(path, panels, **kwargs) -> None:
    write_png(path, render_lines(panels, **kwargs))
