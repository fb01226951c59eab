"""A small CNN trained on a class-conditional run's own real images: the reader of ``evaluate.py classes`` on a folder.

The shapes data has its own classifier (``ldm.eval.classifier``); a user's folder has none, so one is trained on the
images the run was trained on (its ``cache.data.train``, the class sub-folders), checked on the run's held-out
images (``cache.data.val``), and cached as ``<cache_dir>/folder-<hash>.safetensors``, the hash covering the file
names, sizes and the settings. Light augmentation (shifts of a few pixels, Gaussian noise) lets it read generated
samples; no flips, since a class may depend on orientation (digits).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ldm.eval.classifier import DEFAULT_CACHE_DIR, FULL_STRIDE_MIN_SIZE, _conv, fit
from ldm.io.checkpoints import CheckpointError, load_file, save_file_atomic
from ldm.io.module_weights import load_strict, params_on_meta

ARCH_VERSION = 1
MAX_SHIFT = 2  # pixels of random translation in training


@dataclass(frozen=True)
class FolderClassifierSettings:
    """What determines a trained folder classifier (with the data, its cache key)."""

    width: int = 32
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    noise: float = 0.1
    seed: int = 0


class FolderClassifier(nn.Module):
    """conv stack → global average + max pooling → linear: ``n_classes`` logits, ``features`` before the head."""

    def __init__(self, n_classes: int, width: int = 32, size: int = 32) -> None:
        super().__init__()
        self.size = size
        stride = 2 if size >= FULL_STRIDE_MIN_SIZE else 1
        self.body = nn.Sequential(
            _conv(3, width // 2, stride=stride), _conv(width // 2, width), nn.MaxPool2d(2),  # (B, w, S/2s, S/2s)
            _conv(width, 2 * width), _conv(2 * width, 2 * width),  # (B, 2w, S/2s, S/2s)
        )
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 4w)."""
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → logits (B, n_classes)."""
        return self.head(self.features(x))


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item's image and label: (N, 3, S, S) in [-1, 1], (N,)."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def _augment(x: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=generator) * noise
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def train_folder_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int,
                            settings: FolderClassifierSettings) -> FolderClassifier:
    """Train on (x, y); returns the eval-mode model."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = FolderClassifier(n_classes, settings.width, x.shape[-1])
    fit(model, x, y, settings.epochs, settings.batch_size, settings.lr,
        lambda batch: _augment(batch, settings.noise, generator), generator)
    return model.eval().requires_grad_(False)


def data_key(paths: list[str], size: int, n_classes: int, settings: FolderClassifierSettings) -> str:
    """Hash of the training files (paths, sizes), image size, classes and settings."""
    stats = [(p, os.path.getsize(p) if os.path.exists(p) else -1) for p in paths]
    text = json.dumps({"files": stats, "size": size, "classes": n_classes, "arch": ARCH_VERSION, **asdict(settings)})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def get_folder_classifier(train: Dataset, n_classes: int, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                          settings: FolderClassifierSettings = FolderClassifierSettings()) -> FolderClassifier:
    """The classifier of a run's training images: from the cache, or trained now (seconds to minutes) and cached."""
    paths = [str(Path(train.root) / r.rel) for r in train.records]
    path = Path(cache_dir) / f"folder-{data_key(paths, train.size, n_classes, settings)}.safetensors"
    if path.is_file():
        with params_on_meta():  # every weight comes from the cached file
            model = FolderClassifier(n_classes, settings.width, train.size)
        try:
            load_strict(model, load_file(path), f"classifier cache {path}", assign=True)
            return model.eval().requires_grad_(False)
        except (CheckpointError, RuntimeError):
            pass  # unreadable or stale: train over it
    x, y = stack(train)  # (N, 3, S, S), (N,)
    model = train_folder_classifier(x, y, n_classes, settings)
    save_file_atomic(model.state_dict(), path, metadata={"settings": json.dumps(asdict(settings)),
                                                         "images": str(len(x))})
    return model
