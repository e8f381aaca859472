"""Histograms as a PNG, with numpy, zlib and struct only (no plotting library needed).

Each panel is one histogram: bars, axes, a title, the x range and the largest bin count, in
a built-in 3x5 pixel font (upper case, digits and a little punctuation). Enough to see the
shape of a weight distribution in a file browser; the exact numbers are in summary.json.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["render_histograms", "write_histograms_png"]

_GLYPHS = {  # 5 rows of 3 pixels, row by row
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "+": "000010111010000",
    "=": "000111000111000", "_": "000000000000111", "(": "001010010010001",
    ")": "100010010010100", ",": "000000000010100", ":": "000010000010000",
    "/": "001001010100100", " ": "000000000000000",
}
_SCALE = 2                    # font pixels per glyph pixel
_ADVANCE = 4 * _SCALE         # glyph width plus one pixel of space
_INK, _BAR, _MARK = (0, 0, 0), (70, 110, 180), (200, 60, 60)


def _text(image: np.ndarray, x: int, y: int, text: str, color=_INK) -> None:
    """Draw ``text`` with its top-left corner at pixel (x, y); characters outside the font and
    pixels outside the image are skipped."""
    height, width = image.shape[:2]
    for k, char in enumerate(text.upper()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for pos, bit in enumerate(bits):
            if bit == "1":
                top = y + (pos // 3) * _SCALE
                left = x + k * _ADVANCE + (pos % 3) * _SCALE
                if 0 <= top and top + _SCALE <= height and 0 <= left and left + _SCALE <= width:
                    image[top:top + _SCALE, left:left + _SCALE] = color


def _number(value: float) -> str:
    return f"{value:.4G}"


def _panel(title: str, values: np.ndarray, width: int, height: int, bins: int) -> np.ndarray:
    image = np.full((height, width, 3), 255, dtype=np.uint8)
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
    image[bottom, left - 1:right + 1] = _INK
    image[top:bottom + 1, left - 1] = _INK
    _text(image, 10, 8, title)
    _text(image, 8, top, _number(peak))
    _text(image, 8, bottom - 5 * _SCALE, "0")
    _text(image, left - 10, bottom + 8, _number(lo))
    high = _number(hi)
    _text(image, right - len(high) * _ADVANCE, bottom + 8, high)
    return image


def render_histograms(panels: Sequence[tuple[str, np.ndarray]], *, width: int = 720,
                      panel_height: int = 300, bins: int = 40) -> np.ndarray:
    """[h, w, 3] uint8 RGB image: one histogram of ``values`` per ``(title, values)``, stacked."""
    return np.concatenate([_panel(title, values, width, panel_height, bins)
                           for title, values in panels], axis=0)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def write_histograms_png(path: str, panels: Sequence[tuple[str, np.ndarray]], **kwargs) -> None:
    """Write :func:`render_histograms` of ``panels`` as an 8-bit RGB PNG at ``path``."""
    image = render_histograms(panels, **kwargs)
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: filter type 0 (none)
    rows[:, 1:] = image.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))
