"""A captioned folder of images of several aspect ratios (a coloured block on a background), for bucket tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height): wide, landscape, square, portrait, tall
ASPECTS = ((40, 20), (36, 24), (32, 32), (24, 36), (20, 40))
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230)}


def make_aspect_folder(root: Path, n: int = 30, seed: int = 0, scale: int = 1) -> Path:
    """``n`` images cycling through ASPECTS (sides × ``scale``), with metadata.jsonl captions naming the block's
    colour."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        width, height = (side * scale for side in ASPECTS[i % len(ASPECTS)])
        name, colour = list(COLOURS.items())[i // len(ASPECTS) % len(COLOURS)]
        array = np.full((height, width, 3), 240, np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        array[top:top + height // 2, left:left + width // 2] = colour
        Image.fromarray(array).save(root / f"img{i:03d}.png")
        lines.append(json.dumps({"file_name": f"img{i:03d}.png", "text": f"a {name} block"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
