"""Real images from a folder, with captions (metadata.jsonl, sidecar .txt) or class sub-folders.

Layouts (``captions=``):
- ``metadata``: ``root/metadata.jsonl`` with lines ``{"file_name": "a/b.jpg", "text": "a caption"}``
  (Hugging Face's imagefolder convention; an optional integer ``label`` is kept);
- ``subfolders``: ``root/<class>/...`` — label = index of the class in sorted order, caption = the
  folder name with ``_`` → space;
- ``txt``: every image under root, caption from ``<same name>.txt`` next to it;
- ``none``: every image under root, no caption (a VAE's photos);
- ``auto``: metadata if ``metadata.jsonl`` exists, else subfolders if the images live in sub-folders
  (none at the top level), else txt if any image has a ``.txt`` beside it, else none.

Class folders are numbered in natural order (``2`` before ``10``). ``split="train"`` / ``"val"`` picks one side:
``root/train`` / ``root/val`` when the folder is split that way, else a ``val_fraction`` held out by a hash of each
file's path (``ldm.data.folder_layout``). ``hint=True`` adds the Canny edges of each crop (ControlNet).
``buckets={resolution: …, step: …}`` replaces the square ``size`` crop by aspect-ratio buckets (``ldm.data.buckets``):
items then have their bucket's size and carry ``original_size`` and ``crop_top_left``; ``bucket_ids`` groups them.

A folder of real images always has a few bad files. Cheap checks happen at scan time (header, verify,
size limits) and every skipped file is reported in ONE ``DataWarning``; a file that still fails to
decode when loaded is replaced by the next good index, counted and warned. Nothing here crashes on a
bad file; an empty (or all-bad) folder raises ``ValueError`` naming the folder and the extensions.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.core.images import from_pil
from ldm.data.buckets import BucketConfig, Placement, assign, describe, oriented_size
from ldm.data.edges import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, edge_hint, hint_from_image
from ldm.data.folder_layout import (  # noqa: F401  (IMAGE_EXTENSIONS, METADATA_FILE: re-exported)
    CAPTION_MODES,
    DEFAULT_VAL_FRACTION,
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    SPLITS,
    class_folders,
    detect_captions,
    escapes_root,
    held_out,
    ignored_captions,
    image_files,
    read_text,
    split_dirs,
)
from ldm.data.image_files import fit, open_rgb, probe_image

CAPTION_KEYS = ("text", "caption")  # metadata.jsonl column holding the caption, first found wins
DEFAULT_MIN_SIZE = 16  # shorter side in pixels below which an image is skipped
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger images are skipped unread (decompression-bomb guard)
MAX_NAMES_IN_WARNING = 5
EMPTY_CLASSES = ("keep", "refuse")  # a class sub-folder without images: numbered with a warning, or refused
MAX_LOAD_ATTEMPTS = 32  # consecutive undecodable files tolerated by one __getitem__ before giving up
log = logging.getLogger(__name__)


class DataWarning(UserWarning):
    """Skipped files, missing or undecodable captions: the data is usable but not all of it."""


@dataclass(frozen=True)
class Record:
    """One usable image: path relative to the root, caption, class label, hint path (or None)."""

    rel: str
    caption: str
    label: int
    hint: str | None = None


def _summary(items: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{name} ({why})" for name, why in items[:MAX_NAMES_IN_WARNING])
    more = len(items) - MAX_NAMES_IN_WARNING
    return shown + (f", and {more} more" if more > 0 else "")


class ImageFolderDataset(Dataset):
    """Images (+ captions or class labels, + optional stored hints) → batch-format dicts at `size`²."""

    def __init__(
        self,
        root: str,
        size: int = 256,
        captions: str = "auto",
        center_crop: bool = True,
        random_flip: bool = False,
        hint_dir: str | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        split: str | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        hint: bool = False,
        empty_classes: str = "keep",
        buckets: dict | None = None,
    ) -> None:
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {captions!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (or null for every image), got {split!r}")
        if empty_classes not in EMPTY_CLASSES:
            raise ValueError(f"empty_classes must be one of {', '.join(EMPTY_CLASSES)}, got {empty_classes!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        dirs = split_dirs(self.root) if split is not None else None
        self.class_roots = list(dirs.values()) if dirs else [self.root]  # classes numbered over train/ and val/
        self.root = dirs[split] if dirs else self.root
        self.empty_classes = empty_classes
        self.unseen: list[tuple[str, str]] = []  # image files not used and not skipped as bad: (path, why)
        self.split, self.val_fraction = (None if dirs else split), val_fraction  # the hashed split, if any
        self.hint = hint
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.min_size, self.max_pixels = min_size, max_pixels
        self.hint_dir = self._resolve_hint_dir(hint_dir)
        self.skipped: list[tuple[str, str]] = []  # (relative path, reason), from the scan
        self.caption_issues: list[tuple[str, str]] = []  # (relative path, "missing" | "empty" | "not UTF-8")
        self.load_failures = 0  # files that failed to decode in __getitem__ (this process)
        self._bad: set[int] = set()
        self.classes: list[str] = []
        self._files: list[str] | None = None
        self.captions = self._pick_mode(captions)
        scanners = {"metadata": self._scan_metadata, "subfolders": self._scan_subfolders, "txt": self._scan_txt,
                    "none": self._scan_none}
        records = scanners[self.captions]()
        if self.split is not None:
            val = held_out([r.rel for r in records], self.val_fraction)
            records = [r for r in records if (r.rel in val) == (self.split == "val")]
        checked = (self._checked(record) for record in records)
        self.records = [record for record in checked if record is not None]
        self.bucket_config = BucketConfig.from_config(buckets, "buckets") if buckets is not None else None
        self.placements: list[Placement] | None = None
        self.bucket_ids: list[int] | None = None  # set for a bucketed folder: what batches group by
        if self.bucket_config is not None:
            self._place()
        self._report()

    def _place(self) -> None:
        """Put every image in its aspect bucket (``ldm.data.buckets``); warn once for each kind of misfit."""
        log.info("%s: %s", self.root, describe(self.bucket_config))
        assignment = assign(self.bucket_config, [oriented_size(str(self.root / r.rel)) for r in self.records])
        kept = [(r, p) for r, p in zip(self.records, assignment.placements) if p is not None]
        self.skipped += [(r.rel, "smaller than its bucket (buckets.too_small: skip)")
                         for r, p in zip(self.records, assignment.placements) if p is None]
        self.records, self.placements = [r for r, _ in kept], [p for _, p in kept]
        self.bucket_ids = [p.bucket for p in self.placements]
        for misfit in assignment.misfits(self.bucket_config.max_aspect):
            warnings.warn(f"{self.root}: {misfit}", DataWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------- scanning

    def _resolve_hint_dir(self, hint_dir: str | None) -> Path | None:
        if hint_dir is None:
            return None
        for candidate in (Path(hint_dir), self.root / hint_dir):
            if candidate.is_dir():
                return candidate
        raise ValueError(f"hint_dir {hint_dir} not found (neither as given nor under {self.root})")

    def _image_files(self) -> list[str]:
        """Relative posix paths of every image under root (hidden entries and hint_dir excluded), sorted."""
        if self._files is None:
            self._files = image_files(self.root, self.hint_dir, self.unseen)
        return self._files

    def _pick_mode(self, captions: str) -> str:
        mode = detect_captions(self.root, self._image_files()) if captions == "auto" else captions
        ignored = ignored_captions(self.root, self._image_files(), mode)
        if ignored:
            warnings.warn(ignored, DataWarning, stacklevel=4)
        return mode

    def _scan_metadata(self) -> list[Record]:
        path = self.root / METADATA_FILE
        if not path.is_file():
            raise ValueError(f"captions='metadata' but {path} does not exist")
        records = []
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            where = f"{METADATA_FILE}:{number}"
            try:
                line, bad_utf8 = raw.decode("utf-8-sig"), False
            except UnicodeDecodeError:
                line, bad_utf8 = raw.decode("utf-8", errors="replace"), True
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry["file_name"]
            except (json.JSONDecodeError, TypeError, KeyError):
                self.skipped.append((where, "not a JSON object with a file_name"))
                continue
            if not isinstance(name, str) or escapes_root(name):
                self.skipped.append((f"{where} {name!r}", "path escapes the root: refused"))
                continue
            rel = PurePosixPath(name.replace("\\", "/")).as_posix()
            text = next((entry[k] for k in CAPTION_KEYS if k in entry), None)
            issue = "not UTF-8" if bad_utf8 else ("missing" if text is None else None)
            text = "" if text is None else str(text).strip()
            issue = issue or (None if text else "empty")
            if issue:
                self.caption_issues.append((rel, issue))
            label = entry.get("label", 0)
            records.append(Record(rel, text, label if isinstance(label, int) and not isinstance(label, bool) else 0))
        return self._listed_once(records)

    def _listed_once(self, records: list[Record]) -> list[Record]:
        """The first entry of each file named in metadata.jsonl; the other entries and the images it does not name
        are reported (``unseen``)."""
        first: dict[str, Record] = {}
        for record in records:
            if record.rel in first:
                self.unseen.append((record.rel, f"named again in {METADATA_FILE}: the first entry is kept"))
            else:
                first.setdefault(record.rel, record)
        self.unseen += [(f, f"not listed in {METADATA_FILE}: not used") for f in self._image_files() if f not in first]
        return list(first.values())

    def _scan_subfolders(self) -> list[Record]:
        files = self._image_files()
        skip = self.hint_dir if self.hint_dir is not None and self.hint_dir.parent in self.class_roots else None
        self.classes = class_folders(self.class_roots, skip)
        if not any("/" in f for f in files):
            raise ValueError(f"captions='subfolders' but {self.root} has no sub-folders with images")
        self._check_empty_classes(files)
        index = {name: i for i, name in enumerate(self.classes)}
        self.skipped += [(f, "not inside a class sub-folder") for f in files if "/" not in f]
        in_classes = [(f, f.split("/", 1)[0]) for f in files if "/" in f]
        return [Record(f, cls.replace("_", " ").strip(), index[cls]) for f, cls in in_classes]

    def _check_empty_classes(self, files: list[str]) -> None:
        """Class folders without images (in any split) keep their number, with a warning, or are refused."""
        used = set()
        for root in self.class_roots:
            used |= {f.split("/", 1)[0] for f in image_files(root, self.hint_dir) if "/" in f}
        empty = [name for name in self.classes if name not in used]
        if not empty:
            return
        names = ", ".join(empty[:MAX_NAMES_IN_WARNING]) + (", …" if len(empty) > MAX_NAMES_IN_WARNING else "")
        if self.empty_classes == "refuse":
            raise ValueError(f"{len(empty)} class folder(s) of {self.root} hold no images: {names}; add images, "
                             "remove the folder(s), or set empty_classes: keep")
        warnings.warn(f"{len(empty)} class folder(s) hold no images but keep their labels, so the others are "
                      f"numbered as the folders look: {names} (empty_classes: refuse stops instead)", DataWarning,
                      stacklevel=4)

    def _scan_none(self) -> list[Record]:
        return [Record(rel, "", 0) for rel in self._image_files()]

    def _scan_txt(self) -> list[Record]:
        records = []
        for rel in self._image_files():
            text, issue = read_text((self.root / rel).with_suffix(".txt"))
            if issue:
                self.caption_issues.append((rel, issue))
            records.append(Record(rel, text, 0))
        return records

    def _checked(self, record: Record) -> Record | None:
        """Probe the file (and find its hint) → the record with its hint, or None (noted in `skipped`)."""
        path = self.root / record.rel
        reason = probe_image(path, self.min_size, self.max_pixels) if path.is_file() else "file not found"
        if reason is None and self.hint_dir is not None:
            hint = self._find_hint(record.rel)
            if hint is None:
                reason = f"no hint image in {self.hint_dir}"
            record = replace(record, hint=hint)
        if reason is not None:
            self.skipped.append((record.rel, reason))
            return None
        return record

    def _find_hint(self, rel: str) -> str | None:
        for candidate in (self.hint_dir / rel, (self.hint_dir / rel).with_suffix(".png")):
            if candidate.is_file():
                return str(candidate)
        return None

    def _report(self) -> None:
        if not self.records:
            details = f"; {len(self.skipped)} skipped: {_summary(self.skipped)}" if self.skipped else ""
            raise ValueError(
                f"no readable images in {self.root} (captions={self.captions!r}, looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}){details}"
            )
        if self.unseen:
            warnings.warn(f"{self.root}: {len(self.unseen)} image file(s) not used: {_summary(self.unseen)}",
                          DataWarning, stacklevel=3)
        if self.skipped:
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped)} file(s), kept {len(self.records)}: {_summary(self.skipped)}",
                DataWarning,
                stacklevel=3,
            )
        if self.caption_issues:
            counts = {k: sum(1 for _, i in self.caption_issues if i == k) for k in ("missing", "empty", "not UTF-8")}
            what = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            warnings.warn(
                f"{self.root}: {len(self.caption_issues)} caption problem(s) ({what}; missing → '', non-UTF-8 "
                f"decoded with replacement): {_summary(self.caption_issues)}",
                DataWarning,
                stacklevel=3,
            )

    # -------------------------------------------------------------------------------------- loading

    @property
    def num_classes(self) -> int:
        """Number of class sub-folders (1 when labels do not come from folders)."""
        return max(len(self.classes), 1)

    def __len__(self) -> int:
        return len(self.records)

    def only(self, indices: list[int]) -> ImageFolderDataset:
        """A copy holding the items ``indices`` alone, as positions 0…n-1 (what one cache part's workers receive)."""
        part = copy.copy(self)
        part.records = [self.records[i] for i in indices]
        part.placements = [self.placements[i] for i in indices] if self.placements else None
        part.bucket_ids = [self.bucket_ids[i] for i in indices] if self.bucket_ids else None
        part._files, part.unseen, part.skipped, part.caption_issues, part._bad = None, [], [], [], set()
        return part

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self.records), MAX_LOAD_ATTEMPTS)):
            i = (index + attempt) % len(self.records)
            if i in self._bad:
                continue
            try:
                return self._load(self.records[i], self.placements[i] if self.placements else None)
            except Exception as e:  # noqa: BLE001 - a corrupt file must not stop training
                self._bad.add(i)
                self.load_failures += 1
                warnings.warn(
                    f"{self.root}: cannot decode {self.records[i].rel} ({type(e).__name__}: {e}); using the next "
                    f"image instead ({self.load_failures} skipped at load time so far)",
                    DataWarning,
                    stacklevel=2,
                )
        raise RuntimeError(f"{self.root}: {MAX_LOAD_ATTEMPTS} consecutive images near index {index} failed to load")

    def _load(self, record: Record, placement: Placement | None = None) -> dict:
        if placement is not None:
            return self._load_bucketed(record, placement)
        image = open_rgb(self.root / record.rel, draft=self.size)
        width, height = image.size
        scale = self.size / min(width, height)
        resized = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        if self.center_crop:
            left, top = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
        else:
            left = int(torch.randint(resized[0] - self.size + 1, ()))
            top = int(torch.randint(resized[1] - self.size + 1, ()))
        return self._item(record, image, resized, (left, top, left + self.size, top + self.size), self._flip())

    def _load_bucketed(self, record: Record, placement: Placement) -> dict:
        """The image resized to cover its bucket and cropped to it, with its original size and crop top-left."""
        image = open_rgb(self.root / record.rel, draft=max(placement.size))
        top, left = placement.crop(self.bucket_config.crop)
        (height, width), (resized_h, resized_w) = placement.size, placement.resized
        flip = self._flip()
        item = self._item(record, image, (resized_w, resized_h), (left, top, left + width, top + height), flip)
        item["original_size"] = torch.tensor(placement.original)  # (h, w) in pixels, before any resize
        left = resized_w - left - width if flip else left  # the crop's left edge as seen in the mirrored image
        item["crop_top_left"] = torch.tensor((top, left))  # in the resized image, pixels
        return item

    def _flip(self) -> bool:
        return self.random_flip and bool(torch.rand(()) < 0.5)

    def _item(self, record: Record, image: Image.Image, resized: tuple[int, int], box: tuple[int, ...],
              flip: bool) -> dict:
        """Resize to ``resized`` (w, h), crop ``box``, maybe mirror: the item, with a hint fitted the same way."""
        crop = fit(image, resized, box, flip, Image.BICUBIC)
        item = {
            "image": from_pil(crop),  # (3, H, W) in [-1, 1]
            "caption": record.caption,
            "label": record.label,
            "path": record.rel,
        }
        if self.hint and record.hint is None:
            item["hint"] = edge_hint(crop, DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH)  # (3, size, size) in [0, 1]
        elif record.hint is not None:
            hint = open_rgb(record.hint, draft=self.size)
            item["hint"] = hint_from_image(fit(hint, resized, box, flip, Image.BILINEAR))  # (3, size, size)
        return item


FOLDER_TARGET = f"{ImageFolderDataset.__module__}.{ImageFolderDataset.__qualname__}"  # its config target
