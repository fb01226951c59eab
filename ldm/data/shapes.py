"""The embedded default dataset: procedural captioned shapes (+ class label, + Canny edge map).

Each item is one axis-aligned shape (circle, square, upright triangle) of one palette colour on a
background of another, at a random size and position, rendered anti-aliased at any resolution. Item
``i`` of a (seed, split) is a pure function of those three numbers, so it is identical in every process
and every epoch, and the "val" split is a separate random stream. Because the factors are few and
saturated, a generated image can be read back analytically (``ldm.eval.shapes_reader``), which turns
prompt adherence into a number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.core.images import from_pil
from ldm.data.edges import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, edge_hint

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# The eight corners of the RGB cube, pulled slightly inwards: every pair is >= 200 apart in RGB, so a
# colour stays recognisable in a noisy 32-px sample (nearest palette colour), and every pair of colours
# also gives a Canny edge (Canny runs on RGB). Cyan replaces orange, which sits too close to red/yellow.
_LO, _HI = 24, 232
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (_HI, _LO, _LO),
    "green": (_LO, _HI, _LO),
    "blue": (_LO, _LO, _HI),
    "yellow": (_HI, _HI, _LO),
    "cyan": (_LO, _HI, _HI),
    "magenta": (_HI, _LO, _HI),
    "white": (_HI, _HI, _HI),
    "black": (_LO, _LO, _LO),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "a {color} {shape} against a {background} background",
    "a {background} background with a {color} {shape}",
    "{color} {shape}, {background} background",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
RADIUS_FRACTION = (0.2, 0.4)  # shape "radius" (half its bounding box side) as a fraction of the image side
MARGIN_FRACTION = 0.05  # the shape keeps this far from the border, so the border shows the background
SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges at any size
NUM_CLASSES = len(SHAPES) * len(COLORS) * (len(COLORS) - 1)


def caption_for(shape: str, color: str, background: str, phrasing: int = 0) -> str:
    """The caption of a (shape, colour, background) in one of the `CAPTION_TEMPLATES` phrasings."""
    template = CAPTION_TEMPLATES[phrasing % len(CAPTION_TEMPLATES)]
    return template.format(shape=shape, color=color, background=background)


def class_index(shape: str, color: str, background: str) -> int:
    """Class label of a (shape, fill, background) combination (fill ≠ background), in [0, NUM_CLASSES)."""
    s, c, b = SHAPES.index(shape), COLORS.index(color), COLORS.index(background)
    if c == b:
        raise ValueError(f"fill and background must differ, got {color!r} on {background!r}")
    other = b if b < c else b - 1  # rank of the background among the colours ≠ fill
    return (s * len(COLORS) + c) * (len(COLORS) - 1) + other


def class_factors(label: int) -> dict[str, str]:
    """Inverse of `class_index`: label → dict(shape=..., color=..., background=...)."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} outside [0, {NUM_CLASSES})")
    rest, other = divmod(int(label), len(COLORS) - 1)
    s, c = divmod(rest, len(COLORS))
    b = other if other < c else other + 1
    return {"shape": SHAPES[s], "color": COLORS[c], "background": COLORS[b]}


def _rgb(color: str | tuple[int, int, int]) -> tuple[int, int, int]:
    return PALETTE[color] if isinstance(color, str) else tuple(int(v) for v in color)


def render(
    shape: str,
    color: str | tuple[int, int, int],
    background: str | tuple[int, int, int],
    size: int,
    center: tuple[float, float],
    radius: float,
) -> Image.Image:
    """Draw one shape (centre and radius in output pixels, radius = half the bounding box) → RGB image."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _rgb(background))
    draw = ImageDraw.Draw(image)
    # Pixel (i, j) of the big canvas covers [i, i+1); outline=None, so coordinates are the region's edges.
    cx, cy, r = center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)  # PIL boxes are inclusive of their last pixel
    if shape == "circle":
        draw.ellipse(box, fill=_rgb(color))
    elif shape == "square":
        draw.rectangle(box, fill=_rgb(color))
    else:  # upright triangle: apex at the top centre, base along the bottom of the box
        draw.polygon([(cx, cy - r), (cx + r - 1, cy + r - 1), (cx - r, cy + r - 1)], fill=_rgb(color))
    return image.reduce(SUPERSAMPLE)  # box filter: exact area coverage


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one item: its factors, geometry and caption phrasing."""

    shape: str
    color: str
    background: str
    center: tuple[float, float]
    radius: float
    phrasing: int

    @property
    def label(self) -> int:
        return class_index(self.shape, self.color, self.background)

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.color, self.background, self.phrasing)


def sample_spec(rng: np.random.Generator, size: int) -> ShapeSpec:
    """Draw factors, geometry and phrasing from `rng` for an image of side `size`."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    c = int(rng.integers(len(COLORS)))
    b = int(rng.integers(len(COLORS) - 1))
    b = b if b < c else b + 1  # uniform over the colours ≠ fill
    radius = float(rng.uniform(*RADIUS_FRACTION)) * size
    lo = radius + MARGIN_FRACTION * size
    center = (float(rng.uniform(lo, size - lo)), float(rng.uniform(lo, size - lo)))
    return ShapeSpec(shape, COLORS[c], COLORS[b], center, radius, int(rng.integers(len(CAPTION_TEMPLATES))))


class ShapesDataset(Dataset):
    """Procedural captioned shapes: items are dicts with image, caption, label, path (+ hint)."""

    num_classes = NUM_CLASSES

    def __init__(
        self,
        size: int = 32,
        length: int = 20000,
        seed: int = 0,
        split: str = "train",
        hint: bool = False,
        canny_low: int = DEFAULT_CANNY_LOW,
        canny_high: int = DEFAULT_CANNY_HIGH,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.hint, self.canny_low, self.canny_high = hint, canny_low, canny_high
        self._split_key = zlib.crc32(split.encode())  # stable across processes (unlike hash())

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        """The (deterministic) description of item `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, self._split_key, index])
        return sample_spec(rng, self.size)

    def factors(self, index: int) -> dict[str, str]:
        """dict(shape=..., color=..., background=...) of item `index`."""
        s = self.spec(index)
        return {"shape": s.shape, "color": s.color, "background": s.background}

    def render(self, index: int) -> Image.Image:
        """Item `index` as an RGB PIL image."""
        s = self.spec(index)
        return render(s.shape, s.color, s.background, self.size, s.center, s.radius)

    def __getitem__(self, index: int) -> dict:
        s = self.spec(index)
        image = render(s.shape, s.color, s.background, self.size, s.center, s.radius)
        item = {
            "image": from_pil(image),  # (3, H, W) in [-1, 1]
            "caption": s.caption,
            "label": s.label,
            "path": f"shapes/{self.split}/{index}",
        }
        if self.hint:
            item["hint"] = edge_hint(image, self.canny_low, self.canny_high)  # (3, H, W) in [0, 1]
        return item
