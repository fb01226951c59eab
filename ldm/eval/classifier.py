"""A small CNN that classifies shapes images into their NUM_CLASSES (shape × fill × background) labels.

It is the feature extractor of the shapes data's class accuracy and feature FID (an Inception network
trained on ImageNet would be both unavailable offline and blind to what matters here). The network
scores each factor with its own head and a class's logit is the sum of its three factor logits, trained
with the full NUM_CLASSES-way cross-entropy: every class is learnt from every image that shares a factor
with it, which is why a few thousand images and seconds of CPU suffice.

Trained once per setting on ShapesDataset's train split (with light noise augmentation, so it reads
noisy generated samples too), checked on the val split, and cached as
``<cache_dir>/shapes-<size>-<hash of the settings>.safetensors`` (written atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm.core.images import from_pil
from ldm.data.shapes import COLORS, NUM_CLASSES, SHAPES, ShapesDataset, class_factors
from ldm.io.checkpoints import CheckpointError, load_file, save_file_atomic
from ldm.io.module_weights import load_strict, params_on_meta

ARCH_VERSION = 1  # bump when the network or the training recipe changes: old cache files stop matching
TARGET_ACCURACY = 0.98  # val accuracy a default-settings classifier reaches; below it, a warning
DEFAULT_CACHE_DIR = "cache/classifier"
PREDICT_BATCH = 256
FULL_STRIDE_MIN_SIZE = 32  # from this size up the first convolution has stride 2


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that determines a trained classifier (its cache key)."""

    size: int = 32
    width: int = 16
    n_train: int = 8000
    n_val: int = 1000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    noise: float = 0.1  # max std of the additive Gaussian noise augmentation, in [-1, 1] units
    seed: int = 0

    def key(self) -> str:
        """Short hash of the settings and the architecture version."""
        text = json.dumps({**asdict(self), "arch": ARCH_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _factor_index() -> torch.Tensor:
    """(NUM_CLASSES, 3) long: (shape, fill, background) indices of every class label."""
    rows = []
    for label in range(NUM_CLASSES):
        f = class_factors(label)
        rows.append([SHAPES.index(f["shape"]), COLORS.index(f["color"]), COLORS.index(f["background"])])
    return torch.tensor(rows, dtype=torch.long)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ShapesClassifier(nn.Module):
    """conv stack → global average + max pooling (any input size) → factor heads → NUM_CLASSES logits."""

    def __init__(self, width: int = 32, size: int = 32) -> None:
        super().__init__()
        self.size = size  # the resolution it was trained at; inputs of other sizes are resized to it
        stride = 2 if size >= FULL_STRIDE_MIN_SIZE else 1  # small images keep their full resolution
        self.body = nn.Sequential(
            _conv(3, width // 2, stride=stride),  # (B, w/2, S/s, S/s)
            _conv(width // 2, width), nn.MaxPool2d(2),  # (B, w, S/2s, S/2s)
            _conv(width, 2 * width), _conv(2 * width, 2 * width),  # (B, 2w, S/2s, S/2s)
        )
        self.feature_dim = 4 * width
        self.shape_head = nn.Linear(self.feature_dim, len(SHAPES))
        self.fill_head = nn.Linear(self.feature_dim, len(COLORS))
        self.background_head = nn.Linear(self.feature_dim, len(COLORS))
        self.register_buffer("factor_index", _factor_index(), persistent=False)  # (NUM_CLASSES, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → penultimate features (B, D)."""
        h = self.body(x)  # (B, 2w, h, w)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → class logits (B, NUM_CLASSES)."""
        f = self.features(x)
        idx = self.factor_index
        return self.shape_head(f)[:, idx[:, 0]] + self.fill_head(f)[:, idx[:, 1]] + self.background_head(f)[:, idx[:, 2]]


def _render_split(split: str, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ShapesDataset(size=size, length=n, seed=seed, split=split)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])  # (N, 3, S, S), (N,)


def _augment(x: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (every class is mirror-symmetric) and Gaussian noise of random strength."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) * noise
    return (x + sigma * torch.randn(x.shape, generator=generator, device=x.device)).clamp(-1, 1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float,
        augment: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator) -> None:
    """Cross-entropy training: AdamW with a one-cycle schedule over shuffled epochs, each batch augmented."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator, device=generator.device)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(x[batch])), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def train_classifier(settings: ClassifierSettings, device: str | torch.device = "cpu") -> tuple[ShapesClassifier, float]:
    """Train on the shapes train split; returns the eval-mode model and its val-split accuracy."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    x, y = (t.to(device) for t in _render_split("train", settings.n_train, settings.size, settings.seed))
    model = ShapesClassifier(settings.width, settings.size).to(device)
    fit(model, x, y, settings.epochs, settings.batch_size, settings.lr,
        lambda batch: _augment(batch, settings.noise, generator), generator)
    model.eval()
    x_val, y_val = _render_split("val", settings.n_val, settings.size, settings.seed)
    accuracy = (predict(model, x_val) == y_val).float().mean().item()
    return model, accuracy


def cache_path(settings: ClassifierSettings, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Where the classifier of these settings is cached."""
    return Path(cache_dir) / f"shapes-{settings.size}-{settings.key()}.safetensors"


def get_classifier(size: int = 32, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, **overrides) -> ShapesClassifier:
    """The shapes classifier for `size`-px images: loaded from the cache, or trained (seconds) and cached."""
    settings = ClassifierSettings(size=size, **overrides)
    path = cache_path(settings, cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if path.is_file():
        with params_on_meta():  # every weight comes from the cached file
            model = ShapesClassifier(settings.width, settings.size)
        try:
            load_strict(model, load_file(path), f"classifier cache {path}", assign=True)
            return model.eval().requires_grad_(False)
        except (CheckpointError, RuntimeError) as e:  # truncated or stale file: train a fresh one over it
            warnings.warn(f"ignoring unreadable classifier cache {path} ({e}); retraining", stacklevel=2)
    start = time.perf_counter()
    model, accuracy = train_classifier(settings, device)
    model = model.cpu().requires_grad_(False)
    metadata = {"settings": json.dumps(asdict(settings)), "val_accuracy": f"{accuracy:.4f}",
                "train_seconds": f"{time.perf_counter() - start:.1f}", "arch_version": str(ARCH_VERSION)}
    save_file_atomic(model.state_dict(), path, metadata=metadata)
    if accuracy < TARGET_ACCURACY:
        warnings.warn(f"shapes classifier at {size} px reaches only {accuracy:.1%} val accuracy "
                      f"(target {TARGET_ACCURACY:.0%}); class accuracy and FID will be less reliable", stacklevel=2)
    return model


def as_batch(images: torch.Tensor | Sequence[Image.Image], size: int) -> torch.Tensor:
    """A (B, 3, H, W) tensor in [-1, 1] or a list of PIL images → (B, 3, size, size) float tensor in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        images = [im if im.size == (size, size) else im.convert("RGB").resize((size, size), Image.BICUBIC) for im in images]
        images = torch.stack([from_pil(im) for im in images]) if images else torch.zeros(0, 3, size, size)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(-1, 1)


@torch.no_grad()
def _batched(fn, model: ShapesClassifier, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    x = as_batch(images, model.size)
    device = next(model.parameters()).device
    outs = [fn(x[i : i + PREDICT_BATCH].to(device)).cpu() for i in range(0, len(x), PREDICT_BATCH)]
    return torch.cat(outs) if outs else fn(x.to(device)).cpu()


def predict(model: ShapesClassifier, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """Class labels (B,) of images (tensor in [-1, 1] or PIL list; resized to the model's size)."""
    return _batched(model, model, images).argmax(1)


def features(model: ShapesClassifier, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """Penultimate-layer features (B, D) of images (tensor in [-1, 1] or PIL list)."""
    return _batched(model.features, model, images)
