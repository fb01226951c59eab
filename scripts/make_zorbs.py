"""A small captioned folder for the CPU LoRA example: a new word for a new look, and ordinary shapes beside it.

    python scripts/make_zorbs.py --out data/zorbs [--n 64] [--regular 64] [--size 32] [--seed 0]

"a zorb" is a yellow plus sign on a black background (any size and place): a shape the shapes dataset never draws,
named by a word its captions never use. ``--regular`` ordinary shapes images keep their own captions, so that
fine-tuning on the folder teaches the new pairing without unlearning the old ones (DreamBooth's prior images).
Writes ``zorb-NNN.png``, ``shape-NNN.png`` and ``metadata.jsonl`` (file name + caption: ImageFolderDataset's format).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ldm.core.atomic import write_text_atomic
from ldm.core.images import save_image_atomic
from ldm.data.folder import METADATA_FILE
from ldm.data.shapes import MARGIN_FRACTION, PALETTE, RADIUS_FRACTION, SUPERSAMPLE, ShapesDataset

CAPTION = "a zorb"
COLOR, BACKGROUND = "yellow", "black"
ARM_FRACTION = 0.35  # the plus sign's arm width as a fraction of its size


def plus_sign(size: int, center: tuple[float, float], radius: float) -> Image.Image:
    """A ``COLOR`` plus sign of half-size ``radius`` at ``center`` on ``BACKGROUND``, anti-aliased, side ``size``."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[BACKGROUND])
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    arm = ARM_FRACTION * r
    draw.rectangle((cx - r, cy - arm, cx + r - 1, cy + arm - 1), fill=PALETTE[COLOR])  # horizontal bar
    draw.rectangle((cx - arm, cy - r, cx + arm - 1, cy + r - 1), fill=PALETTE[COLOR])  # vertical bar
    return image.reduce(SUPERSAMPLE)


def make_folder(out: Path, n: int, regular: int, size: int, seed: int) -> int:
    """Write ``n`` zorbs and ``regular`` shapes images with their captions; returns how many images."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        radius = float(rng.uniform(*RADIUS_FRACTION)) * size
        lo = radius + MARGIN_FRACTION * size
        center = (float(rng.uniform(lo, size - lo)), float(rng.uniform(lo, size - lo)))
        save_image_atomic(plus_sign(size, center, radius), out / f"zorb-{i:03d}.png")
        lines.append({"file_name": f"zorb-{i:03d}.png", "text": CAPTION})
    shapes = ShapesDataset(size=size, length=max(regular, 1), seed=seed)
    for i in range(regular):
        save_image_atomic(shapes.render(i), out / f"shape-{i:03d}.png")
        lines.append({"file_name": f"shape-{i:03d}.png", "text": shapes.spec(i).caption})
    write_text_atomic(out / METADATA_FILE, "".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, write the folder, print where."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data") / "zorbs", help="the folder to write (default data/zorbs)")
    p.add_argument("--n", type=int, default=64, help="zorb images (default 64)")
    p.add_argument("--regular", type=int, default=64, help="ordinary shapes images beside them (default 64)")
    p.add_argument("--size", type=int, default=32, help="pixels per side (default 32, the shapes model's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.regular < 0 or args.size < 8:
        print("error: --n must be ≥ 1, --regular ≥ 0 and --size ≥ 8", file=sys.stderr)
        return 2
    count = make_folder(args.out, args.n, args.regular, args.size, args.seed)
    print(f"{args.out}: {count} images ({args.n} × {CAPTION!r}, {args.regular} shapes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
