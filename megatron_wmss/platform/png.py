"""PNG images with numpy, zlib and struct only (no plotting library needed): an RGB canvas,
text in a built-in 3x5 pixel font (upper case, digits and a little punctuation), and the
encoder. Plots built on it: curriculum histograms (``curriculum/png.py``), evaluation bar
charts (``evaluation/report.py``).
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

__all__ = ["ADVANCE", "GLYPH_HEIGHT", "INK", "canvas", "draw_text", "encode_png",
           "format_number", "text_width", "write_png"]

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
    "/": "001001010100100", " ": "000000000000000", "%": "101001010100101",
}
SCALE = 2                     # font pixels per glyph pixel
ADVANCE = 4 * SCALE          # glyph width plus one pixel of space
GLYPH_HEIGHT = 5 * SCALE
INK = (0, 0, 0)


def draw_text(image: np.ndarray, x: int, y: int, text: str, color=INK) -> None:
    """Draw ``text`` with its top-left corner at pixel (x, y); characters outside the font and
    pixels outside the image are skipped."""
    height, width = image.shape[:2]
    for k, char in enumerate(text.upper()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for pos, bit in enumerate(bits):
            if bit == "1":
                top = y + (pos // 3) * SCALE
                left = x + k * ADVANCE + (pos % 3) * SCALE
                if 0 <= top and top + SCALE <= height and 0 <= left and left + SCALE <= width:
                    image[top:top + SCALE, left:left + SCALE] = color


def text_width(text: str) -> int:
    """Pixels :func:`draw_text` advances over ``text``."""
    return len(text) * ADVANCE


def format_number(value: float) -> str:
    return f"{value:.4G}"


def canvas(height: int, width: int) -> np.ndarray:
    """A white ``[height, width, 3]`` uint8 RGB image."""
    return np.full((height, width, 3), 255, dtype=np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def encode_png(image: np.ndarray) -> bytes:
    """The 8-bit RGB PNG of a ``[h, w, 3]`` uint8 image."""
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: filter type 0 (none)
    rows[:, 1:] = image.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write :func:`encode_png` of ``image`` to ``path``."""
    with open(path, "wb") as f:
        f.write(encode_png(image))
