"""Aspect-ratio buckets: the bucket list, which bucket an image goes to, and how it is resized and cropped.

    buckets: {resolution: 256, step: 32, max_aspect: 2.0, crop: center, too_small: upscale}

The list holds every size (h, w) whose sides are multiples of ``step`` (the VAE factor × the U-Net's total
downsampling, so every bucket has a latent the U-Net can halve to its bottom), with area h·w ≤ resolution² and
neither side able to grow by one step within that area (the largest bucket of each shape, as kohya sd-scripts'
``make_bucket_resolutions``), and aspect ratio at most ``max_aspect`` either way. An image goes to the bucket nearest
its log aspect ratio, is resized to cover it and cropped (centre, or uniformly at random each time it is loaded);
its original size (h, w) and the crop's top-left (top, left) in the resized image are what SDXL's
micro-conditioning takes. Everything here is a pure function of sizes, for a folder dataset or a streaming one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from PIL import Image

from ldm.core.config import ConfigError, config_section

DEFAULT_MAX_ASPECT = 2.0
CROPS = ("center", "random")
TOO_SMALL = ("upscale", "skip")  # an image smaller than its bucket: upscaled (counted) or left out (counted)
BUCKET_DEFAULTS = {"step": None, "max_aspect": DEFAULT_MAX_ASPECT, "crop": "center", "too_small": "upscale"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class BucketConfig:
    """The ``buckets:`` settings of an image-folder dataset (a plain dict in meta.json)."""

    resolution: int
    step: int
    max_aspect: float = DEFAULT_MAX_ASPECT
    crop: str = "center"
    too_small: str = "upscale"

    @classmethod
    def from_config(cls, node: Mapping, where: str = "buckets") -> BucketConfig:
        """Checked settings from a config mapping; ConfigError naming the key otherwise."""
        section = config_section({where: dict(node)}, where, BUCKET_DEFAULTS, ("resolution",), "(the base size)")
        if section["step"] is None:
            raise ConfigError(f"{where}.step: give the step (VAE factor × the U-Net's downsampling), or build the "
                              "latent cache from a stage-2 config, which fills it in")
        if section["crop"] not in CROPS:
            raise ConfigError(f"{where}.crop: {section['crop']!r} is not one of {', '.join(CROPS)}")
        if section["too_small"] not in TOO_SMALL:
            raise ConfigError(f"{where}.too_small: {section['too_small']!r} is not one of {', '.join(TOO_SMALL)}")
        if not float(section["max_aspect"]) >= 1.0:
            raise ConfigError(f"{where}.max_aspect: must be ≥ 1 (width / height either way), "
                              f"got {section['max_aspect']}")
        config = cls(int(section["resolution"]), int(section["step"]), float(section["max_aspect"]), section["crop"],
                     section["too_small"])
        bucket_sizes(config.resolution, config.step, config.max_aspect)  # a config that gives no bucket fails here
        return config

    def as_dict(self) -> dict:
        """The settings as a plain dict (what meta.json stores)."""
        return asdict(self)

    @property
    def sizes(self) -> list[Size]:
        """The bucket list."""
        return bucket_sizes(self.resolution, self.step, self.max_aspect)


def bucket_sizes(resolution: int, step: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[Size]:
    """Every largest (h, w), sides multiples of ``step``, h·w ≤ resolution², aspect ≤ max_aspect; wide to tall."""
    if step < 1 or resolution < step:
        raise ConfigError(f"buckets: resolution {resolution} gives no bucket with sides a multiple of the step {step} "
                          f"(VAE factor × U-Net downsampling); use a resolution of at least {max(step, 1)}")
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step  # the tallest bucket of this width
        if height < step or area // height // step * step != width:
            continue  # the width could still grow at this height: not a largest bucket
        if max(width / height, height / width) <= max_aspect + 1e-9:
            sizes.add((height, width))
    if not sizes:
        raise ConfigError(f"buckets: resolution {resolution} with step {step} gives no bucket within max_aspect "
                          f"{max_aspect}; raise the resolution or max_aspect")
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(sizes: Sequence[Size], height: int, width: int) -> int:
    """Index of the bucket nearest the image's log aspect ratio (ties: the larger bucket, then the first)."""
    aspect = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: (round(abs(aspect - math.log(sizes[i][1] / sizes[i][0])), 12),
                                                  -sizes[i][0] * sizes[i][1], i))


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the cover size it is resized to, and the crop's top-left in that size."""

    bucket: int
    size: Size  # the bucket (h, w)
    original: Size  # the image (h, w) before any resize
    resized: Size  # (h, w) after resizing to cover the bucket
    upscaled: bool  # the image is smaller than its bucket along a side
    beyond_aspect: bool  # the image is more elongated than max_aspect allows: cropped to the bucket's aspect

    def crop(self, kind: str = "center", generator: torch.Generator | None = None) -> Size:
        """(top, left) of the crop in the resized image: centred, or uniform at random."""
        spare_h, spare_w = self.resized[0] - self.size[0], self.resized[1] - self.size[1]
        if kind == "center":
            return spare_h // 2, spare_w // 2
        top = int(torch.randint(spare_h + 1, (), generator=generator))
        left = int(torch.randint(spare_w + 1, (), generator=generator))
        return top, left


def cover_size(height: int, width: int, target: Size) -> Size:
    """(h, w) of the image resized, aspect kept, to the smallest size covering ``target`` (h, w)."""
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def place(sizes: Sequence[Size], height: int, width: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> Placement:
    """The bucket of an image of height × width pixels and how it is fitted to it."""
    index = nearest_bucket(sizes, height, width)
    target = sizes[index]
    return Placement(index, target, (height, width), cover_size(height, width, target),
                     height < target[0] or width < target[1], max(width / height, height / width) > max_aspect + 1e-9)


def oriented_size(path: str) -> Size:
    """(h, w) of an image file as displayed (its EXIF orientation applied), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return height, width


def size_key(size: Sequence[int]) -> str:
    """``"HxW"``: a bucket's name in meta.json's counts."""
    return f"{size[0]}x{size[1]}"


def describe(config: BucketConfig) -> str:
    """One line listing the buckets (printed when a bucketed dataset starts)."""
    sizes = config.sizes
    listed = ", ".join(f"{w}×{h}" for h, w in sizes)
    return (f"{len(sizes)} aspect buckets (w×h) at resolution {config.resolution}, step {config.step}, "
            f"max aspect {config.max_aspect:g}: {listed}")


@dataclass(frozen=True)
class Assignment:
    """Every image's placement (None: left out as too small), with the counts a dataset warns about."""

    placements: list[Placement | None]
    upscaled: int  # images smaller than their bucket, upscaled
    too_small: int  # images smaller than their bucket, left out (too_small: skip)
    beyond_aspect: int  # images more elongated than max_aspect, cropped to their bucket's aspect

    def misfits(self, max_aspect: float) -> list[str]:
        """One sentence for each kind of misfit there is (upscaled, cropped to the maximum aspect), counted."""
        lines = [f"{self.upscaled} image(s) smaller than their bucket are upscaled (buckets.too_small: skip leaves "
                 "them out)"] if self.upscaled else []
        if self.beyond_aspect:
            lines.append(f"{self.beyond_aspect} image(s) more elongated than buckets.max_aspect {max_aspect:g} are "
                         "cropped to their bucket's aspect")
        return lines

    def counts(self, sizes: Sequence[Size]) -> dict[str, int]:
        """Items per bucket, by ``"HxW"`` (every bucket listed)."""
        counts = {size_key(size): 0 for size in sizes}
        for placement in self.placements:
            if placement is not None:
                counts[size_key(placement.size)] += 1
        return counts


def assign(config: BucketConfig, image_sizes: Sequence[Size]) -> Assignment:
    """Place every (h, w) image in its bucket as ``config`` says (too-small ones upscaled or left out)."""
    sizes = config.sizes
    placements = [place(sizes, h, w, config.max_aspect) for h, w in image_sizes]
    small = sum(p.upscaled for p in placements)
    beyond = sum(p.beyond_aspect for p in placements)
    if config.too_small == "skip":
        placements = [None if p.upscaled else p for p in placements]
        return Assignment(placements, 0, small, beyond)
    return Assignment(placements, small, 0, beyond)
