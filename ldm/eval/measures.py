"""Measures over generated images and what they were asked to show (the pure parts of `evaluate.py`).

- ``class_accuracy(images, labels)``: share the shapes classifier reads as the intended class;
- ``edge_scores(images, hints)``: tolerant edge precision / recall / F1 between each hint and the Canny
  edges of its generated image (same thresholds as the hints were made with), averaged over images;
- ``fid(images, real_images)``: Fréchet distance in the shapes classifier's feature space.
Prompt adherence (analytic read-back of shape and colours) is ``ldm.eval.shapes_reader.adherence``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ldm.core.images import to_uint8
from ldm.core.metrics import EDGE_TOLERANCE, edge_precision_recall_f1
from ldm.data.edges import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, canny
from ldm.eval.classifier import (
    DEFAULT_CACHE_DIR,
    ShapesClassifier,
    features,
    get_classifier,
    predict,
)
from ldm.eval.fid import frechet_distance

ImageLike = Image.Image | np.ndarray | torch.Tensor
HINT_THRESHOLD = 0.5  # a hint pixel (in [0, 1]) above this is an edge


def _side(images: Sequence[ImageLike] | torch.Tensor) -> int:
    """Side length of the first image (PIL, (H, W, C) array or (C, H, W) tensor)."""
    first = images[0]
    if isinstance(first, Image.Image):
        return first.size[1]
    return int(first.shape[-2] if isinstance(first, torch.Tensor) else first.shape[0])


def _classifier_for(images: Sequence[ImageLike] | torch.Tensor, classifier: ShapesClassifier | None,
                    cache_dir: str | os.PathLike) -> ShapesClassifier:
    return classifier if classifier is not None else get_classifier(_side(images), cache_dir)


def class_accuracy(images: Sequence[Image.Image] | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                   classifier: ShapesClassifier | None = None,
                   cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> dict[str, float]:
    """Share of images the shapes classifier assigns their intended label: {"class_accuracy", "n"}."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many labels as images (at least one), got {len(images)} and {len(labels)}")
    predicted = predict(_classifier_for(images, classifier, cache_dir), images)
    return {"class_accuracy": (predicted == labels).float().mean().item(), "n": len(labels)}


def _rgb_uint8(image: ImageLike) -> np.ndarray:
    """PIL image, uint8 (H, W, 3) array or (3, H, W) tensor in [-1, 1] → uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        return to_uint8(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.uint8)


def _hint_edges(hint: ImageLike) -> np.ndarray:
    """A hint as ControlNet takes it — (3, H, W) tensor in [0, 1], PIL edge image, or (H, W) array — → bool (H, W)."""
    if isinstance(hint, torch.Tensor):
        t = hint.detach().float().cpu()
        return (t.amax(0) if t.dim() == 3 else t).numpy() > HINT_THRESHOLD
    if isinstance(hint, Image.Image):
        return np.asarray(hint.convert("L")) > HINT_THRESHOLD * 255
    array = np.asarray(hint)
    array = array.max(-1) if array.ndim == 3 else array
    return array > (HINT_THRESHOLD * 255 if array.dtype == np.uint8 else HINT_THRESHOLD)


def edge_scores(images: Sequence[ImageLike], hints: Sequence[ImageLike], low: int = DEFAULT_CANNY_LOW,
                high: int = DEFAULT_CANNY_HIGH, tolerance: int = EDGE_TOLERANCE) -> dict[str, float]:
    """Mean tolerant edge precision / recall / F1 of each hint vs the Canny edges of its generated image."""
    if len(images) != len(hints) or len(hints) == 0:
        raise ValueError(f"need one hint per image (at least one), got {len(images)} images and {len(hints)} hints")
    totals = np.zeros(3)
    for image, hint in zip(images, hints):
        wanted = _hint_edges(hint)  # (H, W) bool
        got = canny(_rgb_uint8(image), low, high)  # (H, W) 0/255
        if got.shape != wanted.shape:
            raise ValueError(f"image {got.shape[::-1]} and hint {wanted.shape[::-1]} differ in size (W, H)")
        totals += [float(v) for v in edge_precision_recall_f1(wanted, got, tolerance)]
    precision, recall, f1 = totals / len(hints)
    return {"edge_precision": precision, "edge_recall": recall, "edge_f1": f1, "n": len(hints)}


def fid(images: Sequence[Image.Image] | torch.Tensor, real_images: Sequence[Image.Image] | torch.Tensor,
        classifier: ShapesClassifier | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> float:
    """Fréchet distance between generated and real images in the shapes classifier's feature space."""
    model = _classifier_for(real_images, classifier, cache_dir)
    return frechet_distance(features(model, images), features(model, real_images))
