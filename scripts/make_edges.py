"""Canny edge maps (PNG, white on black) for every readable image of a folder, for ControlNet training.

    python scripts/make_edges.py --data data/photos --out data/photos/edges [--low 100 --high 200] [--size 512]

Relative paths are mirrored under --out with a .png suffix (``a/b.jpg`` → ``<out>/a/b.png``), which is
where ``ImageFolderDataset(hint_dir=...)`` looks for them. Existing outputs are kept (the job resumes)
unless --overwrite. Unreadable files are skipped and reported in one warning. --size N resizes each
image's shorter side to N before Canny (edges as thin as at the training resolution); the dataset scales
hints with their image, so any hint size of the same aspect ratio lines up.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Sequence

from PIL import Image, ImageOps
from tqdm import tqdm

from ldm.core.images import save_image_atomic
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.data.edges import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, canny
from ldm.data.folder import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, _summary
from ldm.data.image_files import probe_image, to_rgb

EXIT_BAD_INPUT = 2
MIN_SIZE = 1  # accept any image the decoder reads; Canny works at any size
DEFAULT_OUT_NAME = "edges"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = _Parser(prog="make_edges.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", help=f"output folder (default <data>/{DEFAULT_OUT_NAME})")
    parser.add_argument("--low", type=int, default=DEFAULT_CANNY_LOW, help="Canny low threshold (default: %(default)s)")
    parser.add_argument("--high", type=int, default=DEFAULT_CANNY_HIGH, help="Canny high threshold (default: %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="resize the shorter side to this before Canny "
                        "(default: the image's own size)")
    add_threads_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    return parser.parse_args(argv)


def scan(data: Path, out: Path) -> list[str]:
    """Relative posix paths of the images under `data` (hidden entries, symlinked dirs and `out` excluded)."""
    skip = out.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(data):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != skip)
        found += [Path(dirpath, n).relative_to(data).as_posix() for n in filenames
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def output_path(out: Path, rel: str) -> Path:
    """`<out>/<rel with .png>`; refuses (ValueError) a name that would land outside `out`."""
    target = (out / rel).with_suffix(".png")
    if not target.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{rel} would be written outside {out}: refused")
    return target


def edge_image(path: Path, low: int, high: int, size: int | None) -> Image.Image:
    """Decode (EXIF-rotated, any mode → RGB, as the dataset reads it), optionally resize, Canny → L image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            image = to_rgb(ImageOps.exif_transpose(opened))
    if size is not None:
        scale = size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return Image.fromarray(canny(image, low, high))  # (H, W) 0/255


def make_edges(data: Path, out: Path, low: int, high: int, size: int | None = None,
               overwrite: bool = False) -> dict[str, int]:
    """Write every missing edge map; returns counts (written, existing, skipped)."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got --low {low} --high {high}")
    if size is not None and size < 1:
        raise ValueError(f"--size must be positive, got {size}")
    counts = {"written": 0, "existing": 0, "skipped": 0}
    skipped: list[tuple[str, str]] = []
    claimed: dict[Path, str] = {}
    for rel in tqdm(scan(data, out), desc="edges", unit="img", dynamic_ncols=True, disable=not sys.stderr.isatty()):
        try:
            target = output_path(out, rel)
        except ValueError:
            skipped.append((rel, "escapes the output folder"))
            continue
        if target in claimed:  # a.jpg and a.png both map to a.png: keep the first
            skipped.append((rel, f"same output as {claimed[target]}"))
            continue
        claimed[target] = rel
        if target.exists() and not overwrite:
            counts["existing"] += 1
            continue
        reason = probe_image(data / rel, MIN_SIZE, DEFAULT_MAX_PIXELS)
        if reason is None:
            try:
                edges = edge_image(data / rel, low, high, size)
            except Exception as e:  # noqa: BLE001 - a corrupt file must not stop the job
                reason = f"cannot decode ({type(e).__name__})"
        if reason is not None:
            skipped.append((rel, reason))
            continue
        save_image_atomic(edges, target)  # a write error (disk full, permissions) stops the job
        counts["written"] += 1
    counts["skipped"] = len(skipped)
    if skipped:
        print(f"warning: skipped {len(skipped)} file(s): {_summary(skipped)}", file=sys.stderr)
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Run from the command line; bad input → one `error:` line and exit code 2."""
    setup_cli_logging()
    args = parse_args(argv)
    data = Path(args.data)
    out = Path(args.out) if args.out else data / DEFAULT_OUT_NAME
    try:
        apply_threads(args.threads, announce=False)  # a one-line error stands alone
        if not data.is_dir():
            raise ValueError(f"--data {data} is not a folder")
        counts = make_edges(data, out, args.low, args.high, args.size, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(f"{out}: {counts['written']} written, {counts['existing']} already there, {counts['skipped']} skipped")
    return counts


if __name__ == "__main__":
    main()
