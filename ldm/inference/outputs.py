"""Generations on disk: each image as it arrives (index, seed and condition in its name, its parameters in the
PNG), then a grid carrying the first image's parameters with every seed and condition (as AUTOMATIC1111's)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
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


def settings_text(p: dict, device, seeds: Sequence[int]) -> str:
    """A request's settings as printed before sampling: model, checkpoint, LoRA, sampling, control, editing, seeds."""
    lines = [f"run: {p['run']}" if p["run"] else f"config: {p.get('config') or '(carried by the checkpoint)'}",
             f"checkpoint: {p['checkpoint']} ({'EMA' if p['ema'] else 'raw'} weights, {p['dtype']}, {device})"]
    lines += [f"controlnet: {p['controlnet']}"] if p.get("controlnet") else []
    lines += [f"lora: {lora['file']} (scale {lora['scale']}, {lora['mode']})" for lora in p.get("lora") or []]
    lines.append(f"sampler: {p['sampler']}, steps: {p['steps']}, scale: {p['scale']}, guidance rescale: "
                 f"{p['guidance_rescale']}" + (f", eta: {p['eta']}" if "eta" in p else "") +
                 f", size: {p['width']}x{p['height']}")
    if "control" in p:
        lines.append(f"control: {p['control']}, control scale: {p['control_scale']}, guess mode: {p['guess_mode']}")
    if "init_image" in p:
        lines.append(f"init: {p['init_image']}, strength: {p['strength']}, mask: {p['mask']}")
    lines += [f"negative prompt: {p['negative_prompt']!r}",
              f"seeds: {seeds[0]}..{seeds[-1]} ({len(seeds)} image{'s' if len(seeds) > 1 else ''})"]
    return "\n".join(lines)


def encoding_warnings(encode: Callable[[list], object], conditions: Sequence) -> list[str]:
    """The distinct warnings encoding the distinct conditions gives (a tokenizer's truncated prompts), once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(list(dict.fromkeys(conditions)))
    return list(dict.fromkeys(str(w.message) for w in caught))
