"""What every sampling-based evaluation shares: load a run's pipeline, parse sampler lists, generate with
NFE and wall time measured, save a grid.

NFE is counted, not assumed: a forward hook on the pipeline's U-Net counts its calls per chunk of images
(classifier-free guidance batches cond and uncond into one call, and a ControlNet wraps the same U-Net, so
one call is one denoiser evaluation).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm.core.images import from_pil, image_grid, save_image_atomic
from ldm.data.folder import FOLDER_TARGET
from ldm.diffusion import SAMPLERS
from ldm.eval.heldout import HeldOut
from ldm.eval.report import EvalError
from ldm.inference.pipeline import Pipeline, describe_run

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0
DEFAULT_BATCH = 8
GRID_COLUMNS = 8
GRID_IMAGES = 32
KINDS = {"caption": "text-conditional", "label": "class-conditional"}


@dataclass
class Sampled:
    """Generated images with the denoiser evaluations per image and the wall time they took."""

    images: list[Image.Image]
    nfe: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Throughput of the whole call (sampling + decoding)."""
        return len(self.images) / max(self.seconds, 1e-9)


def add_sampling_arguments(parser: argparse.ArgumentParser, n: int, run_help: str) -> None:
    """--run, --n, --scale, --seed, --batch-size, --device, --grid: the options every sampled measure takes."""
    parser.add_argument("--run", required=True, help=run_help)
    parser.add_argument("--n", type=int, default=n, help=f"number of held-out prompts / images (default {n})")
    parser.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE, help=f"guidance scale (default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"images sampled at once (default {DEFAULT_BATCH})")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also save a grid of generated images here")


def check_counts(args: argparse.Namespace) -> None:
    """One-line errors for a non-positive --n or --batch-size."""
    if args.n < 1:
        raise EvalError(f"--n must be a positive number of images, got {args.n}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")


def check_kind(run: str, condition_key: str | None = None) -> None:
    """Refuse a missing run, one that is not stage 2, or (``condition_key`` "caption" / "label") the other kind."""
    info = describe_run(run)  # one-line errors for a missing run or one that is not stage 2
    if condition_key is not None and info.condition_key != condition_key:
        raise EvalError(f"{run} is a {KINDS.get(info.condition_key, info.condition_key)} run; this measure needs a "
                        f"{KINDS[condition_key]} one")


def load_pipeline(run: str, condition_key: str | None = None, device: str | None = None) -> Pipeline:
    """A stage-2 run's pipeline, after ``check_kind``."""
    check_kind(run, condition_key)
    return Pipeline.from_run(run, device=device)


def folder_nodes(cfg: dict) -> dict | None:
    """A run's ``cache.data`` nodes when they read a folder of images (None for the shapes data)."""
    data = (cfg.get("cache") or {}).get("data") or {}
    train = data.get("train")
    return data if isinstance(train, dict) and train.get("target") == FOLDER_TARGET else None


def require_shapes(pipe: Pipeline, measure: str) -> None:
    """Refuse, in one line, a shapes-only measure on a run trained on a folder."""
    if folder_nodes(describe_run(pipe.source["run"]).config) is not None:
        raise EvalError(f"evaluate.py {measure} reads the shapes data's prompts and images, but "
                        f"{pipe.source['run']} was trained on a folder; for a class run use evaluate.py classes "
                        f"(a classifier trained on its own images, and a feature FID)")


def parse_samplers(spec: str) -> list[tuple[str, int]]:
    """``"ddim:50,dpmpp_2m:20"`` → [("ddim", 50), ("dpmpp_2m", 20)], checked against SAMPLERS."""
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS:
            raise EvalError(f"unknown sampler {name!r} in --samplers; choose from {', '.join(SAMPLERS)}")
        if not steps.isdigit() or int(steps) < 1:
            raise EvalError(f"--samplers entries are NAME:STEPS with STEPS ≥ 1, got {item!r}")
        pairs.append((name, int(steps)))
    if not pairs:
        raise EvalError("--samplers is empty; give e.g. ddim:50,dpmpp_2m:20")
    return pairs


def conditions_for(pipe: Pipeline, held: HeldOut) -> list:
    """The held-out items as the run is conditioned: captions for a text run, class labels for a class run."""
    return list(held.labels) if pipe.condition_key == "label" else list(held.captions)


def generate(pipe: Pipeline, conditions: Sequence, sampler: str, steps: int, guidance: float, seed: int,
             batch_size: int = DEFAULT_BATCH, **options) -> Sampled:
    """Images for ``conditions``, with the U-Net calls per image (NFE) and the wall time counted."""
    calls = 0

    def count(*_) -> None:
        nonlocal calls
        calls += 1

    unet = getattr(pipe.model, "diffusion_model", pipe.model)
    hook = unet.register_forward_hook(count)
    try:
        start = time.perf_counter()
        images = pipe(list(conditions), steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                      batch_size=batch_size, **options)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    chunks = -(-len(conditions) // batch_size)
    return Sampled(images, calls // chunks, seconds)


def save_grid(images: Sequence[Image.Image], path: str | Path | None, rows: Sequence[Sequence[Image.Image]] = ()) -> None:
    """Save up to GRID_IMAGES images (or given rows, e.g. hint above output) as one PNG, when a path is given."""
    if not path:
        return
    rows = list(rows) or [images[i : i + GRID_COLUMNS] for i in range(0, min(len(images), GRID_IMAGES), GRID_COLUMNS)]
    tensors = [torch.stack([from_pil(im) for im in row]) for row in rows if row]  # each (B, 3, H, W)
    save_image_atomic(image_grid([torch.cat(tensors)], ncol=len(rows[0])), path)
    log.info("grid: %s", path)
