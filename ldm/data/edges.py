"""Canny edge maps for ControlNet hints (white edges on black, 3 channels, values in [0, 1]).

OpenCV's Canny is run on the RGB image itself (it takes, per pixel, the channel with the strongest
gradient), as ControlNet's Canny annotator does: two colours of equal grey level still give an edge.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

# ControlNet v1.x's Canny annotator defaults (hysteresis thresholds on the Sobel gradient magnitude).
DEFAULT_CANNY_LOW = 100
DEFAULT_CANNY_HIGH = 200
EDGE_VALUE = 255


def _as_uint8_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """PIL image or uint8 array (H, W) / (H, W, C) → contiguous uint8 array (H, W) or (H, W, 3)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"canny expects a uint8 image (0..255), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"canny expects (H, W) or (H, W, 3) images, got shape {array.shape}")
    return np.ascontiguousarray(array)


def canny(
    image: np.ndarray | Image.Image, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH
) -> np.ndarray:
    """Canny edges of an RGB (or grey) image → uint8 (H, W) with values 0 and 255."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return cv2.Canny(_as_uint8_array(image), int(low), int(high))  # (H, W)


def edges_to_hint(edges: np.ndarray) -> torch.Tensor:
    """uint8 edge map (H, W) (0/255) → (3, H, W) float tensor in [0, 1]."""
    hint = torch.from_numpy(np.ascontiguousarray(edges)).float() / EDGE_VALUE  # (H, W)
    return hint.unsqueeze(0).expand(3, -1, -1).contiguous()  # (3, H, W)


def edge_hint(
    image: np.ndarray | Image.Image, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH
) -> torch.Tensor:
    """Canny edges of an image as a ControlNet hint: (3, H, W) float tensor in [0, 1]."""
    return edges_to_hint(canny(image, low, high))


def hint_from_image(image: Image.Image) -> torch.Tensor:
    """A stored 8-bit hint image (e.g. a PNG written by make_edges.py, grey or RGB) → (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / EDGE_VALUE  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
