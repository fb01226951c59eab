"""Read (shape, colour, background) back from a shapes image, analytically — prompt adherence.

1. background = nearest palette colour to the per-channel median of the border ring;
2. rough shape mask = pixels far from that colour; its largest connected component, eroded, gives the
   fill colour (median → nearest palette colour other than the background);
3. soft coverage of every pixel = its position on the segment background → fill (anti-aliasing aware),
   restricted to the component; for each kind, the ideal template with the same area and centroid is
   rendered and the kind with the best soft IoU wins.
Never raises on odd inputs (noise, a uniform image): it returns its best guess.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import COLORS, PALETTE, SHAPES, render

BORDER_FRACTION = 1 / 32  # ring width (≥ 1 px) read for the background; shapes keep 5 % clear of it
ROUGH_DISTANCE = 80.0  # RGB distance from the background that marks a pixel as "shape" (palette gap ≥ 200)
SOFT_THRESHOLD = 0.5  # coverage above which a pixel counts as inside the shape
MIN_INTERIOR_PIXELS = 4  # below this, the fill colour is read from the un-eroded mask
# Template geometry per kind: area = AREA_FACTOR · r², centroid = centre + (0, CENTROID_DY · r).
AREA_FACTOR = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)


def _to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """PIL image, uint8-range array (H, W, 3) or tensor (3, H, W) in [-1, 1] → float32 (H, W, 3) 0..255."""
    if isinstance(image, torch.Tensor):
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return np.nan_to_num(array[..., :3]).clip(0, 255)


def _nearest_colors(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB → (..., K) distances to each palette colour."""
    return np.linalg.norm(rgb[..., None, :] - _PALETTE_RGB, axis=-1)


def _border(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    k = max(1, round(min(h, w) * BORDER_FRACTION))
    ring = np.ones((h, w), bool)
    ring[k:-k, k:-k] = False
    return array[ring]  # (N, 3)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _read_fill(array: np.ndarray, component: np.ndarray, background: int) -> int:
    interior = cv2.erode(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pixels = array[interior] if interior.sum() >= MIN_INTERIOR_PIXELS else array[component]
    if len(pixels) == 0:  # nothing but background: guess the colour farthest from it
        pixels = array.reshape(-1, 3)[np.argmax(_nearest_colors(array.reshape(-1, 3))[:, background])][None]
    distances = _nearest_colors(np.median(pixels, axis=0))
    distances[background] = np.inf  # the fill never equals the background
    return int(np.argmin(distances))


def _template(shape: str, size: tuple[int, int], area: float, centroid: tuple[float, float]) -> np.ndarray:
    """Soft coverage (H, W) in [0, 1] of the ideal `shape` with this area and centroid."""
    h, w = size
    radius = float(np.sqrt(area / AREA_FACTOR[shape]))
    center = (centroid[0], centroid[1] - CENTROID_DY[shape] * radius)
    side = max(h, w)  # render() draws square canvases; crop to (H, W)
    image = render(shape, (255, 255, 255), (0, 0, 0), side, center, radius)
    return np.asarray(image, dtype=np.float32)[:h, :w, 0] / 255.0


def _read_shape(array: np.ndarray, component: np.ndarray, background: int, fill: int) -> str:
    bg, fg = _PALETTE_RGB[background], _PALETTE_RGB[fill]
    direction = fg - bg
    coverage = ((array - bg) @ direction / float(direction @ direction)).clip(0, 1)  # (H, W)
    near = cv2.dilate(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    coverage = np.where(near, coverage, 0.0)
    area = float(coverage.sum())
    if area < 1.0:
        return SHAPES[0]
    ys, xs = np.mgrid[0 : array.shape[0], 0 : array.shape[1]] + 0.5  # pixel centres
    centroid = (float((coverage * xs).sum() / area), float((coverage * ys).sum() / area))
    scores = {}
    for shape in SHAPES:
        template = _template(shape, array.shape[:2], area, centroid)
        scores[shape] = np.minimum(coverage, template).sum() / max(np.maximum(coverage, template).sum(), 1e-6)
    return max(scores, key=scores.get)


def read_factors(image: Image.Image | np.ndarray | torch.Tensor) -> dict[str, str]:
    """Best guess of dict(shape=..., color=..., background=...) for one image (PIL, HWC uint8, or CHW ±1)."""
    array = _to_rgb_array(image)  # (H, W, 3)
    background = int(np.argmin(_nearest_colors(np.median(_border(array), axis=0))))
    far = _nearest_colors(array)[..., background] > ROUGH_DISTANCE  # (H, W)
    component = _largest_component(far)
    fill = _read_fill(array, component, background)
    shape = _read_shape(array, component, background, fill)
    return {"shape": shape, "color": COLORS[fill], "background": COLORS[background]}


def adherence(
    images: Iterable[Image.Image | np.ndarray | torch.Tensor], factors_list: Sequence[dict]
) -> dict[str, float]:
    """Share of images whose shape / color / background / all three match the requested factors."""
    keys = ("shape", "color", "background")
    hits = {k: 0 for k in (*keys, "all")}
    n = 0
    for image, wanted in zip(images, factors_list, strict=True):
        got = read_factors(image)
        match = [got[k] == wanted[k] for k in keys]
        for k, ok in zip(keys, match):
            hits[k] += ok
        hits["all"] += all(match)
        n += 1
    return {k: v / max(n, 1) for k, v in hits.items()} | {"n": n}
