"""A folder of 64-px crops of real photographs that Debian's wallpaper packages install, split by photo.

    apt-get download mate-backgrounds plasma-workspace-wallpapers       # or apt-get install them (then --packages /)
    for f in *.deb; do d=${f%%_*}; mkdir -p pkgs/$d; dpkg-deb -x $f pkgs/$d; done
    python scripts/make_photo_crops.py --packages pkgs --out /work/data/photos64

Each photo (``PHOTOS``: package, file, licence, author) is resized so its shorter side is each of ``SCALES`` and
cut into non-overlapping ``--size`` crops on a centred grid. The photos in ``HELD_OUT`` go to ``<out>/val`` only, the
others to ``<out>/train``: no crop of a held-out photo is ever trained on. ``<out>/SOURCES.md`` lists every photo,
its package and its licence; the run is deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image

from ldm.core.logging import setup_cli_logging

DEFAULT_SIZE = 64
SCALES = (192, 288, 432)  # shorter side of each resized copy of a photo, in pixels
MATE = "mate-backgrounds", "usr/share/backgrounds/mate/nature"
PLASMA = "plasma-workspace-wallpapers", "usr/share/wallpapers"
GPL = "GPL-2+"
LGPL = "LGPL-3"
CC = "CC-BY-SA-4.0"


class Photo(NamedTuple):
    """One photograph: its package, path inside the package, licence and author (from the package's metadata)."""

    name: str
    package: str
    path: str
    licence: str
    author: str


def _mate(name: str, author: str) -> Photo:
    return Photo(name, MATE[0], f"{MATE[1]}/{name}.jpg", GPL, author)


def _plasma(name: str, file: str, author: str, licence: str = LGPL) -> Photo:
    return Photo(name, PLASMA[0], f"{PLASMA[1]}/{name}/contents/images/{file}", licence, author)


PHOTOS: tuple[Photo, ...] = (
    _mate("Aqua", "Charles Barbin"), _mate("Blinds", "Lennart Poettering"), _mate("Dune", "Marco Cogoni"),
    _mate("FreshFlower", "Jens Ansorg"), _mate("Garden", "Charles Barbin"),
    _mate("GreenMeadow", "Timothy Schellhase"), _mate("LadyBird", "Charles Barbin"),
    _mate("RainDrops", "blackcombwhistler07"), _mate("Storm", "Sergey Nazarov"), _mate("TwoWings", "Charles Barbin"),
    _mate("Wood", "Jean-François Fortin Tam"), _mate("YellowFlower", "Charles Barbin"),
    _plasma("BytheWater", "1920x1080.jpg", "Maciej Wiklo"), _plasma("ColdRipple", "1920x1080.jpg", "Risto Saukonpää"),
    _plasma("ColorfulCups", "2560x1600.jpg", "Dmitri Popov"), _plasma("DarkestHour", "1920x1080.jpg", "Risto Saukonpää"),
    _plasma("EveningGlow", "1920x1080.jpg", "Ian Hex"), _plasma("FallenLeaf", "1920x1080.jpg", "Martin Klapetek"),
    _plasma("Grey", "1920x1080.jpg", "Sigi Sagi"), _plasma("Kite", "1920x1080.jpg", "Risto Saukonpää"),
    _plasma("OneStandsOut", "1920x1080.jpg", "Risto Saukonpää"), _plasma("Path", "1920x1080.jpg", "Risto Saukonpää"),
    _plasma("Volna", "5120x2880.jpg", "Nikita Babin", CC), _plasma("summer_1am", "1920x1080.jpg", "Risto Saukonpää"),
)
# Never trained on: a saturated red flower, saturated cups, a forest, a dark lake, a sky.
HELD_OUT = frozenset({"Garden", "ColorfulCups", "Path", "DarkestHour", "Kite"})


def locate(packages: Path, photo: Photo) -> Path:
    """The photo under ``packages/<package>/`` (extracted .deb files) or under ``packages/`` (installed: ``/``)."""
    for candidate in (packages / photo.package / photo.path, packages / photo.path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{photo.path} of package {photo.package} not found under {packages}: apt-get download "
                            f"{photo.package} and extract it there (see --help)")


def crops(image: Image.Image, size: int, scales: Sequence[int]) -> list[Image.Image]:
    """Non-overlapping ``size``-px crops on a centred grid of the image resized to each shorter side in ``scales``."""
    out = []
    for short in scales:
        factor = short / min(image.size)
        width, height = round(image.width * factor), round(image.height * factor)
        resized = image.resize((width, height), Image.LANCZOS)
        cols, rows = width // size, height // size
        left, top = (width - cols * size) // 2, (height - rows * size) // 2
        out += [resized.crop((left + c * size, top + r * size, left + (c + 1) * size, top + (r + 1) * size))
                for r in range(rows) for c in range(cols)]
    return out


def build(packages: Path, out: Path, size: int = DEFAULT_SIZE) -> dict[str, int]:
    """Write the crops and SOURCES.md; returns the number of crops per split."""
    counts = {"train": 0, "val": 0}
    for photo in PHOTOS:
        split = "val" if photo.name in HELD_OUT else "train"
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(locate(packages, photo)) as image:
            pieces = crops(image.convert("RGB"), size, SCALES)
        for i, piece in enumerate(pieces):
            piece.save(folder / f"{photo.name}-{i:04d}.png")
        counts[split] += len(pieces)
    rows = [f"| {p.name} | {'val' if p.name in HELD_OUT else 'train'} | {p.package} | {p.path} | {p.licence} | "
            f"{p.author} |" for p in PHOTOS]
    table = "| photo | split | Debian package | file | licence | author |\n|---|---|---|---|---|---|\n"
    (out / "SOURCES.md").write_text(f"{size}-px crops at shorter sides {', '.join(map(str, SCALES))} px.\n\n"
                                    + table + "\n".join(rows) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Parse, build, print the counts."""
    setup_cli_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", required=True, help="folder of extracted packages (pkgs/<package>/usr/…) or /")
    parser.add_argument("--out", required=True, help="output folder (train/, val/, SOURCES.md)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"crop size (default {DEFAULT_SIZE})")
    args = parser.parse_args(argv)
    try:
        counts = build(Path(args.packages), Path(args.out), args.size)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{args.out}: {counts['train']} training crops from {len(PHOTOS) - len(HELD_OUT)} photos, "
          f"{counts['val']} held-out crops from {len(HELD_OUT)} other photos")
    return counts


if __name__ == "__main__":
    main()
