"""Class sub-folders of real images from Debian's ``dataset-fashion-mnist`` package (Zalando's Fashion-MNIST, MIT):
28×28 grey photographs of ten kinds of clothing, one folder per class, named as the dataset names the classes.

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb pkgs/dataset-fashion-mnist
    python scripts/make_class_folders.py --packages pkgs --out /work/data/fashion --per-class 300

The first ``--per-class`` images of each class in the package's training file are written as PNGs under
``<out>/<class>/``; stages then hold out 5 % of them by a hash of their paths (``ldm.data.folder_layout``).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

PACKAGE = "dataset-fashion-mnist"
DATA_DIR = "usr/share/datasets/fashion-mnist"
IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
IMAGE_HEADER, LABEL_HEADER = 16, 8  # bytes before the data in the idx files
SIDE = 28
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
DEFAULT_PER_CLASS = 300


def read_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels from the package's training files."""
    with gzip.open(folder / IMAGES) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=IMAGE_HEADER).reshape(-1, SIDE, SIDE)
    with gzip.open(folder / LABELS) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=LABEL_HEADER)
    return images, labels


def build(packages: Path, out: Path, per_class: int) -> int:
    """Write ``per_class`` PNGs per class under ``out/<class>/``; returns the number written."""
    folder = next((p for p in (packages / PACKAGE / DATA_DIR, packages / DATA_DIR) if p.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"{DATA_DIR} not found under {packages}: apt-get download {PACKAGE} and extract it "
                                f"to {packages / PACKAGE} (see --help)")
    images, labels = read_idx(folder)
    written = 0
    for index, name in enumerate(CLASSES):
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(np.flatnonzero(labels == index)[:per_class]):
            Image.fromarray(images[row]).save(target / f"{i:05d}.png")
            written += 1
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build, print the count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", required=True, help="folder of extracted packages (pkgs/<package>/usr/…) or /")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per class)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="images per class")
    args = parser.parse_args(argv)
    try:
        written = build(Path(args.packages), Path(args.out), args.per_class)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{args.out}: {written} images in {len(CLASSES)} class folders ({', '.join(CLASSES)})")
    return written


if __name__ == "__main__":
    main()
