"""A built-in, procedurally drawn image dataset: one kind of object per class.

The demo and the tests need data that exists without a download, renders in seconds, and
still shows the failure CCUA targets: a collapsed tail class draws nearly the same picture over
and over, while a healthy class varies in position, size, orientation, colour and background.
Every image is a pure function of (seed, class, index), so a class's first k images are the
same whether 10 or 10,000 are drawn, and splits drawn in separate calls agree.

Shapes are drawn as polygons on a canvas ``supersample`` times larger than the output and
box-filtered down, which antialiases the edges at the cost of one small PIL draw per image.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from raydiff.data.longtail import BuiltSource, SplitPlan, class_counts, cut_long_tail
from raydiff.errors import RaydiffError

SHAPE_NAMES = (
    "circle", "square", "triangle", "ring", "cross", "star",
    "ellipse", "stripes", "diamond", "heart", "hexagon", "crescent",
)  # fmt: skip
DEFAULT_NUM_CLASSES = 10
DEFAULT_IMAGES_PER_CLASS = 500
DEFAULT_IMBALANCE_RATIO = 10.0
DEFAULT_SUPERSAMPLE = 4
_ROUND_VERTICES = 48

# How far each kind may turn, in degrees. Squares, diamonds, crosses and hearts stay near
# upright: turned freely, a square becomes a diamond and the classes would overlap.
_MAX_TURN = {"square": 15, "diamond": 15, "cross": 20, "heart": 25}


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _outline(kind: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Polygons to fill and polygons to cut out, in unit coordinates (y down, radius about 1)."""
    if kind == "circle":
        return [_regular(_ROUND_VERTICES)], []
    if kind == "ellipse":
        return [_regular(_ROUND_VERTICES) * [1.0, rng.uniform(0.4, 0.65)]], []
    if kind == "square":
        return [np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])], []
    if kind == "diamond":
        return [np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]])], []
    if kind == "triangle":
        return [_regular(3, phase=-math.pi / 2)], []
    if kind == "hexagon":
        return [_regular(6)], []
    if kind == "ring":
        return [_regular(_ROUND_VERTICES)], [_regular(_ROUND_VERTICES, rng.uniform(0.45, 0.62))]
    if kind == "crescent":
        bite = _regular(_ROUND_VERTICES, rng.uniform(0.75, 0.9)) + [rng.uniform(0.35, 0.55), 0.0]
        return [_regular(_ROUND_VERTICES)], [bite]
    if kind == "cross":
        arm = rng.uniform(0.22, 0.32)
        bar = np.array([[-1.0, -arm], [1.0, -arm], [1.0, arm], [-1.0, arm]])
        return [bar, bar[:, ::-1]], []
    if kind == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        angles = -math.pi / 2 + math.pi * np.arange(10) / 5
        return [radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)], []
    if kind == "stripes":
        width = rng.uniform(0.18, 0.24)
        return [np.array([[x - width, -0.8], [x + width, -0.8], [x + width, 0.8], [x - width, 0.8]])
                for x in (-0.56, 0.0, 0.56)], []  # fmt: skip
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, _ROUND_VERTICES, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y + 2.5], axis=1) / 16.5], []
    raise ValueError(f"unknown shape {kind!r}")


def _place(points: np.ndarray, turn: float, stretch: float, radius: float, centre) -> list:
    """Unit-coordinate polygon -> canvas pixel coordinates for PIL."""
    c, s = math.cos(turn), math.sin(turn)
    scaled = points * [stretch, 1.0 / stretch]
    rotated = scaled @ np.array([[c, s], [-s, c]])
    return [tuple(p) for p in rotated * radius + centre]


def _shape_mask(kind: str, rng: np.random.Generator, resolution: int, supersample: int):
    """Coverage in [0, 1] (HxW float32) of one randomly posed object of the given kind."""
    canvas = resolution * supersample
    radius = rng.uniform(0.22, 0.4) * canvas
    centre = rng.uniform(radius + 0.02 * canvas, canvas - radius - 0.02 * canvas, size=2)
    max_turn = math.radians(_MAX_TURN.get(kind, 180))
    turn = rng.uniform(-max_turn, max_turn)
    stretch = rng.uniform(0.88, 1.12)
    fills, holes = _outline(kind, rng)
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, value in [(p, 255) for p in fills] + [(p, 0) for p in holes]:
        draw.polygon(_place(polygon, turn, stretch, radius, centre), fill=value)
    coverage = np.asarray(mask, dtype=np.float32).reshape(
        resolution, supersample, resolution, supersample
    )
    return coverage.mean(axis=(1, 3)) / 255.0


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright object colour and two dark, muted background colours, so the object stands out."""
    fg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.08, 0.4)
    bg_a = colorsys.hsv_to_rgb(hue, sat, val)
    bg_b = colorsys.hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0, sat,
                               np.clip(val + rng.uniform(-0.2, 0.2), 0.0, 0.45))  # fmt: skip
    return np.array(fg), np.array(bg_a), np.array(bg_b)


def _render_one(kind: str, rng: np.random.Generator, resolution: int, supersample: int):
    coverage = _shape_mask(kind, rng, resolution, supersample)[..., None]
    fg, bg_a, bg_b = _colours(rng)
    angle = rng.uniform(0, 2 * math.pi)
    grid = (np.arange(resolution) + 0.5) / resolution - 0.5
    ramp = math.cos(angle) * grid[None, :] + math.sin(angle) * grid[:, None] + 0.5
    background = bg_a + np.clip(ramp, 0.0, 1.0)[..., None] * (bg_b - bg_a)
    image = background * (1.0 - coverage) + fg * coverage
    return np.round(image * 255.0).astype(np.uint8)


def _occurrence_indices(labels: np.ndarray) -> list[int]:
    """For each label, how many times it occurred before: the default image index."""
    seen: dict[int, int] = {}
    indices = []
    for label in labels.tolist():
        indices.append(seen.get(label, 0))
        seen[label] = indices[-1] + 1
    return indices


def render(
    labels: Sequence[int],
    indices: Sequence[int] | None = None,
    *,
    resolution: int = 32,
    seed: int = 0,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> np.ndarray:
    """Draw one image per label as uint8 NHWC; image i is a function of (seed, label, index).

    Without ``indices`` the k-th occurrence of a label gets index k, so ``render([0, 0, 1])``
    draws images 0 and 1 of class 0 and image 0 of class 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(SHAPE_NAMES)):
        raise RaydiffError(f"shape labels must lie in 0..{len(SHAPE_NAMES) - 1}")
    if resolution < 4 or supersample < 1 or seed < 0:
        raise RaydiffError(f"bad shapes request: resolution {resolution}, seed {seed}")
    if indices is None:
        indices = _occurrence_indices(labels)
    out = np.empty((len(labels), resolution, resolution, 3), dtype=np.uint8)
    for row, (label, index) in enumerate(zip(labels.tolist(), indices)):
        rng = np.random.default_rng((seed, label, int(index)))
        out[row] = _render_one(SHAPE_NAMES[label], rng, resolution, supersample)
    return out


def make_shapes(
    images_per_class: int = DEFAULT_IMAGES_PER_CLASS,
    num_classes: int = DEFAULT_NUM_CLASSES,
    *,
    resolution: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A balanced set: (uint8 NHWC images, int64 labels), class by class, for in-memory use."""
    check_num_classes(num_classes)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    indices = np.tile(np.arange(images_per_class), num_classes)
    return render(labels, indices, resolution=resolution, seed=seed), labels


def check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise RaydiffError(
            f"shapes has {len(SHAPE_NAMES)} kinds of object; --num-classes must lie in "
            f"1..{len(SHAPE_NAMES)}, got {num_classes}"
        )


def build_shapes(
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    images_per_class: int = DEFAULT_IMAGES_PER_CLASS,
    imbalance_ratio: float = DEFAULT_IMBALANCE_RATIO,
    resolution: int = 32,
    seed: int = 0,
) -> BuiltSource:
    """Shapes-LT, built the way CIFAR-LT is: a balanced pool and an exponential cut of it.

    The pool (``images_per_class`` per class) is the balanced reference; the training split
    keeps n_c images of class c by the same selection rule CIFAR-LT uses.
    """
    check_num_classes(num_classes)
    if images_per_class < 1:
        raise RaydiffError(f"--images-per-class must be at least 1, got {images_per_class}")
    images, labels = make_shapes(images_per_class, num_classes, resolution=resolution, seed=seed)
    indices = np.tile(np.arange(images_per_class), num_classes)
    sources = [f"{SHAPE_NAMES[c]}/{i:05d}" for c, i in zip(labels.tolist(), indices.tolist())]
    pool = SplitPlan(labels=labels, sources=sources, images=images)
    train, profile = cut_long_tail(pool, num_classes, imbalance_ratio, images_per_class, seed)
    return BuiltSource(
        source="shapes",
        class_names=list(SHAPE_NAMES[:num_classes]),
        train=train,
        reference=pool,
        imbalance_ratio=float(imbalance_ratio),
        build={
            "profile": "exponential",
            "n_max": images_per_class,
            "requested_counts": profile,
            "available_counts": class_counts(labels, num_classes),
            "selection": "per class in order: RandomState(seed).shuffle(indices), keep first n_c",
            "reference": "the full balanced pool the training split was cut from",
            "generator": {"supersample": DEFAULT_SUPERSAMPLE, "seed": seed},
        },
    )
