"""What evaluation and the demo leave for people: a metrics chart, a metrics table, and a sample
grid with one row per class. Pillow only (no plotting library is a dependency)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from raydiff.runlog import image_grid

# (key in a set's metrics, label, number format); only those present are drawn or listed.
METRIC_COLUMNS = (
    ("fid", "FID", "{:.2f}"),
    ("kid_mean", "KID", "{:.4f}"),
    ("isc_mean", "IS", "{:.3f}"),
    ("precision", "Precision", "{:.3f}"),
    ("recall", "Recall", "{:.3f}"),
)
_SET_COLOURS = {"overall": (70, 70, 70), "head": (31, 119, 180), "body": (255, 127, 14),
                "tail": (214, 39, 40)}
_PANEL_W, _PANEL_H, _PAD = 230, 200, 28


def _present(sets: dict) -> list[tuple[str, str, str]]:
    return [col for col in METRIC_COLUMNS
            if any(s.get(col[0]) is not None for s in sets.values())]


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str,
           values: list[tuple[str, float | None]], font) -> None:
    draw.text((x0 + 8, 6), title, fill=(0, 0, 0), font=font)
    finite = [v for _, v in values if v is not None and np.isfinite(v)]
    top = max([abs(v) for v in finite] + [1e-12])
    base_y, height = _PANEL_H - _PAD, _PANEL_H - 2 * _PAD - 10
    width = (_PANEL_W - 20) // max(len(values), 1)
    draw.line([(x0 + 8, base_y), (x0 + _PANEL_W - 8, base_y)], fill=(0, 0, 0))
    for i, (name, value) in enumerate(values):
        left = x0 + 12 + i * width
        if value is not None and np.isfinite(value):
            bar = int(height * abs(value) / top)
            draw.rectangle([left, base_y - bar, left + width - 8, base_y],
                           fill=_SET_COLOURS.get(name, (120, 120, 120)))
            draw.text((left, base_y - bar - 12), f"{value:.4g}", fill=(0, 0, 0), font=font)
        draw.text((left, base_y + 4), name, fill=(0, 0, 0), font=font)


def metrics_chart(result: dict) -> Image.Image:
    """One bar panel per metric, one bar per set (overall, head, body, tail)."""
    sets = result["sets"]
    columns = _present(sets) or [("fid", "FID", "{:.2f}")]
    image = Image.new("RGB", (_PANEL_W * len(columns), _PANEL_H), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (key, label, _) in enumerate(columns):
        _panel(draw, i * _PANEL_W, label, [(name, s.get(key)) for name, s in sets.items()], font)
    return image


def metrics_table(result: dict) -> str:
    """The per-set metrics as a Markdown table."""
    sets = result["sets"]
    columns = _present(sets)
    lines = ["| set | images | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name, values in sets.items():
        cells = ["n/a" if values.get(key) is None else fmt.format(values[key])
                 for key, _, fmt in columns]
        lines.append(f"| {name} | {values['num_generated']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_rows_grid(images: np.ndarray, labels: np.ndarray, class_order: Sequence[int],
                    per_row: int) -> np.ndarray:
    """The first ``per_row`` images of each class, one row per class in ``class_order``."""
    height, width, channels = images.shape[1:]
    blank = np.full((height, width, channels), 255, np.uint8)
    tiles = []
    for c in class_order:
        picked = list(images[labels == c][:per_row])
        tiles.extend(picked + [blank] * (per_row - len(picked)))
    return image_grid(np.stack(tiles), per_row)
