"""The loss curve as a PNG, drawn with numpy and written with zlib: no plotting library needed.

The plot shows the per-step loss (light) and the smoothed loss (dark) against the step, with the step range
and loss range printed in the corners in a 3x5 pixel font.
"""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": (7, 5, 5, 5, 7),
    "1": (2, 6, 2, 2, 7),
    "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7),
    "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7),
    "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2),
    "-": (0, 0, 7, 0, 0),
    " ": (0, 0, 0, 0, 0),
    "e": (0, 7, 7, 4, 7),
    "l": (6, 2, 2, 2, 7),
    "o": (0, 7, 5, 5, 7),
    "s": (0, 7, 6, 3, 7),
    "t": (2, 7, 2, 2, 3),
    "p": (0, 7, 5, 7, 4),
}


def _text(img, x: int, y: int, text: str, scale: int = 2, color=(40, 40, 40)) -> None:
    for i, ch in enumerate(text):
        for r, bits in enumerate(_FONT.get(ch, _FONT[" "])):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    x0, y0 = x + (i * 4 + c) * scale, y + r * scale
                    img[y0 : y0 + scale, x0 : x0 + scale] = color


def _line(img, xs, ys, color) -> None:
    """A polyline through pixel coordinates, drawn by sampling each segment densely."""
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
        py = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
        img[py, px] = color
    if len(xs) == 1:
        img[int(ys[0]), int(xs[0])] = color


def write_png(path: Path, img) -> None:
    """Write an (H, W, 3) uint8 array as an RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    from ..storage import write_file_atomic

    write_file_atomic(path, png)


def _floats(row: dict) -> tuple[float, float, float] | None:
    """(step, step loss, smoothed loss) of a metrics row, or None when one is missing or not finite."""
    try:
        values = tuple(float(row[k]) for k in ("step", "step_loss", "loss"))
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(np.isfinite(values)) else None


def plot_loss(metrics_csv: Path, png: Path, width: int = 720, height: int = 420) -> bool:
    """Draw metrics.csv's loss curve into `png`; False when there is nothing to draw.

    Rows whose loss is not a finite number (a diverged step, a damaged line) are left out: they have no place on the
    axis, and the plot is drawn from the others.
    """
    if not metrics_csv.is_file():
        return False
    with open(metrics_csv, newline="") as f:
        rows = [_floats(r) for r in csv.DictReader(f)]
    rows = [r for r in rows if r is not None]
    if not rows:
        return False
    step, raw, smooth = (np.array(column) for column in zip(*rows))
    left, right, top, bottom = 60, 20, 30, 40
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    lo, hi = float(min(raw.min(), smooth.min())), float(max(raw.max(), smooth.max()))
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = float(step.min()), float(step.max())
    s1 = s1 if s1 > s0 else s0 + 1.0
    pw, ph = width - left - right - 1, height - top - bottom - 1
    xs = left + (step - s0) / (s1 - s0) * pw
    img[top : top + ph + 1, left] = (0, 0, 0)
    img[top + ph, left : left + pw + 1] = (0, 0, 0)
    for values, color in ((raw, (160, 190, 230)), (smooth, (20, 60, 160))):
        _line(img, xs, top + (hi - values) / (hi - lo) * ph, color)
    _text(img, 4, top, f"{hi:.3g}")
    _text(img, 4, top + ph - 10, f"{lo:.3g}")
    _text(img, left, top + ph + 8, f"{s0:.0f}")
    _text(img, width - right - 4 * 2 * len(f"{s1:.0f}"), top + ph + 8, f"{s1:.0f}")
    _text(img, left + pw // 2 - 16, top + ph + 8, "step")
    _text(img, left + 4, 8, "loss")
    write_png(png, img)
    return True
