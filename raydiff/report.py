"""What evaluation, classification and the demo leave for people: metrics and accuracy charts,
metrics and comparison tables, and a sample grid with one row per class. Pillow only (no
plotting library is a dependency)."""

from __future__ import annotations

from collections.abc import Sequence

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
    ("classifier_top1", "Classifier top-1", "{:.3f}"),  # --features classifier:CKPT
    ("copy_rate", "Copy rate", "{:.3f}"),  # share of samples much closer to a training image
    ("diversity", "Diversity", "{:.3f}"),  # pairwise spread relative to the reference's
)
_SET_COLOURS = {"overall": (70, 70, 70), "head": (31, 119, 180), "body": (255, 127, 14),
                "tail": (214, 39, 40), "many": (44, 160, 44), "medium": (148, 103, 189),
                "few": (140, 86, 75)}
_MAX_CLASS_BARS = 50  # more classes than this: per-class top-1 is in results.json only
_PANEL_W, _PANEL_H, _PAD = 230, 200, 28


def _present(sets: dict) -> list[tuple[str, str, str]]:
    return [col for col in METRIC_COLUMNS
            if any(s.get(col[0]) is not None for s in sets.values())]


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str,
           values: list[tuple[str, float | None]], font, panel_w: int = _PANEL_W,
           colours: list[str] | None = None, top: float | None = None) -> None:
    """Bars of ``values``, coloured by name (or by ``colours``, set names, one per bar), the
    tallest as high as the panel unless ``top`` fixes the scale."""
    draw.text((x0 + 8, 6), title, fill=(0, 0, 0), font=font)
    finite = [v for _, v in values if v is not None and np.isfinite(v)]
    top = top or max([abs(v) for v in finite] + [1e-12])
    base_y, height = _PANEL_H - _PAD, _PANEL_H - 2 * _PAD - 10
    width = (panel_w - 20) // max(len(values), 1)
    label_chars = max(1, (width - 2) // 6)  # the default font is 6 px wide
    draw.line([(x0 + 8, base_y), (x0 + panel_w - 8, base_y)], fill=(0, 0, 0))
    for i, (name, value) in enumerate(values):
        left = x0 + 12 + i * width
        colour = _SET_COLOURS.get(colours[i] if colours else name, (120, 120, 120))
        if value is not None and np.isfinite(value):
            bar = int(height * abs(value) / top)
            draw.rectangle([left, base_y - bar, left + max(width - 8, 2), base_y], fill=colour)
            draw.text((left, base_y - bar - 12), f"{value:.4g}"[:label_chars + 1],
                      fill=(0, 0, 0), font=font)
        draw.text((left, base_y + 4), name[:label_chars], fill=(0, 0, 0), font=font)


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


def _groups_present(groups: dict) -> list[tuple[str, float | None]]:
    return [(name, group["top1"]) for name, group in groups.items() if group["classes"]]


def accuracy_chart(results: dict) -> Image.Image:
    """``raydiff classify``: top-1 on the reference split overall and per many/medium/few
    group, per head/body/tail third, and per class from head to tail (coloured by third)."""
    evaluation = results["evaluation"]
    panels = [("top-1: overall, shot groups",
               [("overall", evaluation["top1"])] + _groups_present(evaluation["shot_groups"]),
               _PANEL_W, None),
              ("top-1: head / body / tail", _groups_present(evaluation["groups"]), _PANEL_W,
               None)]
    names = list(evaluation["per_class"])
    if len(names) <= _MAX_CLASS_BARS:
        order = sorted(range(len(names)), key=lambda c: -results["train_counts"][c])
        third = {c: name for name, g in evaluation["groups"].items() for c in g["classes"]}
        panels.append(("top-1 per class, head to tail",
                       [(names[c], evaluation["per_class"][names[c]]) for c in order],
                       max(_PANEL_W, 20 + 36 * len(names)), [third[c] for c in order]))
    image = Image.new("RGB", (sum(p[2] for p in panels), _PANEL_H), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x0 = 0
    for title, values, panel_w, colours in panels:
        _panel(draw, x0, title, values, font, panel_w, colours, top=1.0)
        x0 += panel_w
    return image


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def comparison_table(runs: list[tuple[str, dict]]) -> str:
    """``raydiff classify`` runs side by side: the mix and top-1 (%) on the reference split,
    overall, per shot group and per third; group sizes (classes) in the header, from the
    first run."""
    first = runs[0][1]["evaluation"]
    kinds = [("shot_groups", name) for name in first["shot_groups"]] + \
            [("groups", name) for name in first["groups"]]
    header = [f"{name} ({len(first[kind][name]['classes'])})" for kind, name in kinds]
    lines = ["| run | mix | real | synthetic | top-1 | " + " | ".join(header) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(kinds)]
    for label, results in runs:
        evaluation, mixed = results["evaluation"], results["mix"]
        cells = [_percent(evaluation[kind].get(name, {}).get("top1")) for kind, name in kinds]
        lines.append(f"| {label} | {mixed['rule']} | {mixed['real_images']} | "
                     f"{mixed['synthetic_images']} | {_percent(evaluation['top1'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
