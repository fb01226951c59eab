"""How a folder of images is laid out: its images, caption mode, class names (natural order) and held-out split.

These are cheap (file names only, no image is opened), so command lines can report what a folder holds before
anything is built, and ``ImageFolderDataset`` uses the same rules when it scans.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
CAPTION_MODES = ("auto", "metadata", "txt", "subfolders", "none")
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.05
HASH_BUCKETS = 10_000  # resolution of the hashed held-out split
_DIGITS = re.compile(r"(\d+)")

CAPTION_REASONS = {
    "metadata": f"{METADATA_FILE} found",
    "subfolders": "images in sub-folders, no .txt captions: one class per sub-folder",
    "txt": "a .txt caption beside the images (they win over sub-folder names)",
    "none": f"a flat folder without {METADATA_FILE} or .txt captions: no captions",
}


def read_text(path: Path) -> tuple[str, str | None]:
    """Read a caption file → (stripped text, issue or None); issue is "missing", "empty" or "not UTF-8"."""
    try:
        data = path.read_bytes()
    except OSError:
        return "", "missing"
    try:
        text, issue = data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        text, issue = data.decode("utf-8", errors="replace"), "not UTF-8"
    text = text.strip()
    return text, issue or (None if text else "empty")


def escapes_root(name: str) -> bool:
    """True for a metadata file name that is absolute or climbs out of the root with `..`."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return posix.is_absolute() or windows.is_absolute() or bool(windows.drive) or ".." in windows.parts


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``2`` before ``10``, ``img9`` before ``img10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in _DIGITS.split(name) if part)


def image_files(root: Path, skip_dir: Path | None = None, unseen: list[tuple[str, str]] | None = None) -> list[str]:
    """Relative posix paths of every image under ``root`` (hidden entries and ``skip_dir`` left out), sorted. Folders
    it cannot enter — a link to a folder (not followed), an unreadable one — go to ``unseen`` as (path, reason)."""
    skip = skip_dir.resolve() if skip_dir is not None else None
    found: list[str] = []
    unseen = [] if unseen is None else unseen

    def unreadable(error: OSError) -> None:
        unseen.append((Path(error.filename).relative_to(root).as_posix() or ".", "unreadable folder"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        kept = []
        for d in dirnames:
            path = Path(dirpath, d)
            if d.startswith(".") or path.resolve() == skip:
                continue
            if path.is_symlink():
                unseen.append((path.relative_to(root).as_posix(), "a link to a folder: not followed"))
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def has_caption_files(root: Path, files: list[str]) -> bool:
    """Whether any image has a ``.txt`` caption beside it."""
    return any((root / f).with_suffix(".txt").is_file() for f in files)


def detect_captions(root: Path, files: list[str]) -> str:
    """The caption mode ``auto`` means for this folder: metadata, txt (per-image captions win over sub-folder
    names), subfolders or none."""
    if (root / METADATA_FILE).is_file():
        return "metadata"
    if has_caption_files(root, files):
        return "txt"
    if files and all("/" in f for f in files):
        return "subfolders"
    return "none"


def ignored_captions(root: Path, files: list[str], mode: str) -> str | None:
    """What caption files a caption mode leaves unread, in words (None when it reads all there are)."""
    if mode != "metadata" and (root / METADATA_FILE).is_file():
        return f"{root / METADATA_FILE} exists but captions={mode} ignores it (use captions=metadata or auto)"
    if mode in ("subfolders", "none") and has_caption_files(root, files):
        n = sum((root / f).with_suffix(".txt").is_file() for f in files)
        return f"{n} image(s) in {root} have a .txt caption that captions={mode} ignores (use captions=txt or auto)"
    return None


def class_folders(roots: list[Path], skip_dir: Path | None = None) -> list[str]:
    """Every class sub-folder of ``roots`` (a split folder's train/ and val/ together), with images or not, in
    natural order: the label of a class is its index here, the same in every split."""
    skip = skip_dir.resolve() if skip_dir is not None else None
    names = {d.name for root in roots if root.is_dir() for d in root.iterdir()
             if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.resolve() != skip}
    return sorted(names, key=natural_key)


def class_names(files: list[str]) -> list[str]:
    """The class sub-folders holding images, in natural order (their index is the label)."""
    return sorted({f.split("/", 1)[0] for f in files if "/" in f}, key=natural_key)


def _bucket(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HASH_BUCKETS


def held_out(rels: list[str], fraction: float) -> set[str]:
    """The held-out (val) images: those whose path hashes below ``fraction``, so the split never changes when
    images are added and stage 1, the latent cache and the evaluation agree on it; at least one image."""
    chosen = {rel for rel in rels if _bucket(rel) < fraction * HASH_BUCKETS}
    return chosen or ({min(rels, key=_bucket)} if len(rels) > 1 else set())


def split_dirs(root: Path) -> dict[str, Path] | None:
    """``{train: root/train, val: root/val}`` when the folder is split that way already, else None."""
    dirs = {split: root / split for split in SPLITS}
    return dirs if all(d.is_dir() for d in dirs.values()) else None


@dataclass(frozen=True)
class FolderSummary:
    """What a folder holds, from file names: image count, caption mode (and why), classes, split layout."""

    root: Path
    images: int
    captions: str
    reason: str
    classes: list[str]
    split_dirs: dict[str, Path] | None

    def describe(self) -> str:
        """One line: where, how many, which captions and why."""
        where = "train/ and val/ sub-folders" if self.split_dirs else f"{self.images} images"
        classes = f", {len(self.classes)} classes" if self.captions == "subfolders" else ""
        return f"{self.root}: {where}{classes}; captions: {self.captions} ({self.reason})"


def summarize(root: str | os.PathLike, captions: str = "auto") -> FolderSummary:
    """Scan file names under ``root`` (its ``train/`` when split) → FolderSummary; ValueError when unusable."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {captions!r}")
    dirs = split_dirs(root)
    scan_root = dirs["train"] if dirs else root
    files = image_files(scan_root)
    if not files:
        raise ValueError(f"no images in {scan_root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    mode = detect_captions(scan_root, files) if captions == "auto" else captions
    reason = CAPTION_REASONS[mode] if captions == "auto" else "as asked"
    ignored = ignored_captions(scan_root, files, mode)
    reason += f"; {ignored}" if ignored else ""
    names = class_folders(list(dirs.values()) if dirs else [root]) if mode == "subfolders" else []
    return FolderSummary(root, len(files), mode, reason, names, dirs)
