"""Generations on disk: each image as it arrives (index, seed and condition in its name, its parameters in the
PNG), then a grid carrying the first image's parameters with every seed and condition (as AUTOMATIC1111's)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from ldm.core.errors import UserError
from ldm.core.images import from_pil, image_grid, save_image_atomic
from ldm.inference.generation import Generation
from ldm.inference.png_params import INDEX_DIGITS, next_index, png_info, slug

GRID_MAX_COLUMNS = 8


def shown_condition(condition, class_names: tuple[str, ...] | None):
    """A prompt as is; a class label as its name when the model keeps names (``seven``), else its index."""
    return class_names[condition] if class_names and not isinstance(condition, str) else condition


def grid_columns(count: int, per_condition: int) -> int:
    """One row per condition when it fits, else up to ``GRID_MAX_COLUMNS`` a row."""
    return per_condition if 1 < per_condition <= 2 * GRID_MAX_COLUMNS else min(count, GRID_MAX_COLUMNS)


def save_generations(parts: Iterable[Generation], out: Path, grid: bool, per_condition: int,
                     class_names: tuple[str, ...] | None = None,
                     on_saved: Callable[[Path, int, object], None] | None = None) -> list[Path]:
    """Write each image as its batch arrives, then a grid of them all (when more than one); returns the paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from e
    start = next_index(out)
    paths, kept, first, seeds, conditions = [], [], None, [], []
    for part in parts:
        for image, seed, condition, params in zip(part.images, part.seeds, part.conditions, part.parameters):
            shown = shown_condition(condition, class_names)
            path = out / f"{start + len(paths):0{INDEX_DIGITS}d}-s{seed}-{slug(shown)}.png"
            save_image_atomic(image, path, pnginfo=png_info(params))
            paths.append(path)
            kept += [image] if grid else []
            first = first or params
            seeds.append(seed)
            conditions.append(condition)
            if on_saved is not None:
                on_saved(path, seed, shown)
    if len(kept) > 1:
        paths.append(save_grid(kept, out / f"grid-{start:0{INDEX_DIGITS}d}.png", per_condition,
                               {**first, "seeds": seeds, "conditions": conditions}))
    return paths


def save_grid(images: list[Image.Image], path: Path, per_condition: int, params: dict) -> Path:
    """A grid of images with the given parameters."""
    grid = image_grid([torch.stack([from_pil(im) for im in images])], ncol=grid_columns(len(images), per_condition))
    save_image_atomic(grid, path, pnginfo=png_info(params))
    return path
