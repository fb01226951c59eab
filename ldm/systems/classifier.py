"""A noise-aware latent classifier for classifier guidance, trained on the latent cache (Dhariwal & Nichol 2021, §4).

Each step draws the cached latents, noise levels as the guided model's schedule draws them, and the path point
x_t = α·(z + σ·ε); the classifier is trained with cross-entropy to tell the class at every noise level.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.schedule import Schedule
from ldm.systems.latents import adopt_cache_scale, cache_meta, cached_latents
from ldm.systems.optim import AdamW, total_steps

VAL_NOISE_SEED = 1234


class NoisyClassifier(L.LightningModule):
    """``classifier`` (e.g. ``LatentClassifier``) trained on noisy cached latents of ``schedule``'s path."""

    def __init__(self, classifier: nn.Module, schedule: Schedule, optimizer: AdamW | None = None,
                 label_key: str = "label", scale_factor: float | None = None):
        super().__init__()
        self.classifier = classifier
        self.schedule = schedule
        self.optimizer_settings = optimizer or AdamW(lr=1e-3)
        self.label_key = label_key
        self.register_buffer("scale_factor", torch.tensor(scale_factor if scale_factor else math.nan))

    def on_fit_start(self) -> None:
        """Take the latents' scale factor from the cache (the guided model's is measured the same way)."""
        adopt_cache_scale(self.scale_factor, None, cache_meta(self.trainer))

    def noisy(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, t): latents z noised at drawn noise levels, on the schedule's path, and the network time."""
        sigma = self.schedule.sample_sigmas(z.shape[0], generator, z.device)  # (B,)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        alpha, _ = self.schedule.alpha_sigma(sigma)
        x_t = append_dims(alpha, z.ndim) * (z + append_dims(sigma, z.ndim) * noise)  # (B, C, h, w)
        return x_t, self.schedule.timestep(sigma)

    def step(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(cross-entropy loss, accuracy) on a batch."""
        x_t, t = self.noisy(cached_latents(batch, self.scale_factor, generator), generator)
        labels = batch[self.label_key].long()
        logits = self.classifier(x_t, t)  # (B, n_classes)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Noisy latents → logits → cross-entropy → log."""
        loss, accuracy = self.step(batch)
        self.log_dict({"train/loss": loss, "train/acc": accuracy}, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        """The same noise every validation, so the curves compare."""
        self._val_generator = torch.Generator(self.device).manual_seed(VAL_NOISE_SEED)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out loss and accuracy over all noise levels."""
        loss, accuracy = self.step(batch, self._val_generator)
        self.log_dict({"val/loss": loss, "val/acc": accuracy}, prog_bar=True, batch_size=len(batch[self.label_key]))

    def configure_optimizers(self) -> dict:
        """The configured optimiser over the classifier, its LR schedule stepped per batch."""
        return self.optimizer_settings.build(list(self.classifier.parameters()), total_steps(self.trainer))
