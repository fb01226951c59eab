"""A fixed, balanced set of held-out shapes items: the prompts, labels and real images evaluations compare against.

Items come from ShapesDataset's ``val`` split (never trained on): for a list of classes that spreads shape
kinds, fill colours and backgrounds evenly (``balanced_classes``), the first val items of those classes. The set depends only on (n, seed), never on the image size, so every run is asked the
same prompts; the real images are rendered at the size of the run being measured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from PIL import Image

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset, class_index

HELD_OUT_SPLIT = "val"
SCAN_LIMIT = 10**6  # val items looked at, at most, to find every wanted class
SPEC_SIZE = 32  # items' factors do not depend on the size; geometry is re-drawn at the run's size
INDEX_CACHE_SIZE = 16  # (n, seed) index lists kept per process


@dataclass
class HeldOut:
    """n held-out items: captions, class labels, factors, and (when asked) real images and edge hints."""

    indices: list[int]
    captions: list[str]
    labels: list[int]
    factors: list[dict[str, str]]
    images: list[Image.Image]  # real renders at the requested size (empty when size is None)
    hints: list[torch.Tensor]  # (3, H, W) in [0, 1] Canny hints (empty unless asked)


def balanced_classes(n: int) -> list[int]:
    """n class labels cycling through every (shape, fill, background) with each factor value equally often.

    Item i has fill i mod 8, shape i mod 3 and background fill + 1 + (i div 8 mod 7) (never the fill): each
    block of 8 uses every background once, and the 168 classes all appear before any repeats.
    """
    labels = []
    for i in range(n):
        fill = i % len(COLORS)
        background = (fill + 1 + (i // len(COLORS)) % (len(COLORS) - 1)) % len(COLORS)
        labels.append(class_index(SHAPES[i % len(SHAPES)], COLORS[fill], COLORS[background]))
    return labels


def balanced_indices(n: int, seed: int = 0) -> list[int]:
    """Indices of n val-split items whose classes are ``balanced_classes(n)``: the first unused item of each."""
    if n < 1:
        raise ValueError(f"need at least one item, got {n}")
    return list(_balanced_indices(n, seed))


@functools.lru_cache(maxsize=INDEX_CACHE_SIZE)
def _balanced_indices(n: int, seed: int) -> tuple[int, ...]:
    """``balanced_indices`` found by scanning the val split's items in order (kept: `evaluate.py all` asks each
    measure's set again)."""
    wanted = balanced_classes(n)
    dataset = ShapesDataset(size=SPEC_SIZE, length=SCAN_LIMIT, seed=seed, split=HELD_OUT_SPLIT)
    pending: dict[int, list[int]] = {}  # class → positions in `wanted` still without an item
    for position, label in enumerate(wanted):
        pending.setdefault(label, []).append(position)
    chosen: list[int | None] = [None] * n
    for index in range(len(dataset)):
        positions = pending.get(dataset.spec(index).label)
        if positions:
            chosen[positions.pop(0)] = index
            n -= 1
            if n == 0:
                return tuple(chosen)
    raise RuntimeError(f"fewer than {len(wanted)} val items of the wanted classes among the first {SCAN_LIMIT}")


def held_out(n: int, size: int | None = None, seed: int = 0, hints: bool = False) -> HeldOut:
    """The balanced held-out set of n items; real images (and hints) rendered at ``size`` px when given."""
    indices = balanced_indices(n, seed)
    spec_set = ShapesDataset(size=SPEC_SIZE, length=SCAN_LIMIT, seed=seed, split=HELD_OUT_SPLIT)
    specs = [spec_set.spec(i) for i in indices]
    images: list[Image.Image] = []
    hint_list: list[torch.Tensor] = []
    if size is not None:
        real = ShapesDataset(size=size, length=SCAN_LIMIT, seed=seed, split=HELD_OUT_SPLIT, hint=hints)
        images = [real.render(i) for i in indices]
        hint_list = [real[i]["hint"] for i in indices] if hints else []
    return HeldOut(indices, [s.caption for s in specs], [s.label for s in specs],
                   [{"shape": s.shape, "color": s.color, "background": s.background} for s in specs],
                   images, hint_list)
