"""AutoencoderKL: stage 1's KL-regularised VAE as a thin LightningModule (the loss math lives in losses.py).

State-dict keys of the networks are latent-diffusion's (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``), so SD's VAE weights load into a model built from SD's ddconfig.

Training uses Lightning 2 manual optimisation with two Adam optimisers (autoencoder, discriminator).
``trainer.global_step`` counts generator steps, i.e. batches: the discriminator is stepped through the
strategy's precision plugin directly (same autocast / GradScaler handling as ``LightningOptimizer.step``)
but without the progress bookkeeping that would count it as a second step. Before ``disc_start`` the
discriminator does no work at all: no forward, no backward, no optimiser step.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.nets import Decoder, Encoder
from ldm.images import image_grid, save_image_atomic
from ldm.metrics import psnr
from ldm.optim import fused_supported

ADAM_BETAS = (0.5, 0.9)  # latent-diffusion's VAE / VQGAN optimiser betas
NUM_SAMPLE_IMAGES = 8
SAMPLES_DIR = "samples"
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup: int = 0, total: int = 0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (0: constant)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if total > 0:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    return factor


def _check_ddconfig(ddconfig: dict) -> None:
    """Reject a ddconfig key neither Encoder nor Decoder takes, naming it (a typo must not become a default)."""
    known = set(inspect.signature(Encoder).parameters) | set(inspect.signature(Decoder).parameters)
    unknown = sorted(set(ddconfig) - known)
    if unknown:
        raise ValueError(f"ddconfig.{unknown[0]}: unknown key; Encoder/Decoder take {', '.join(sorted(known))}")
    if not ddconfig.get("double_z", True):
        raise ValueError("ddconfig.double_z must be true for a KL autoencoder (the encoder emits mean and logvar)")


class AutoencoderKL(L.LightningModule):
    """KL-VAE: ``encode(x) → DiagonalGaussianDistribution``, ``decode(z) → x̂``; trains with LPIPSWithDiscriminator."""

    def __init__(self, ddconfig: dict, embed_dim: int, loss: nn.Module | None = None, learning_rate: float = 4.5e-6,
                 sample_every_n_steps: int = 0, image_key: str = "image", num_sample_images: int = NUM_SAMPLE_IMAGES,
                 disc_learning_rate: float | None = None, lr_schedule: Literal["constant", "cosine"] = "constant",
                 warmup_steps: int = 0, channels_last: bool = False):
        super().__init__()
        _check_ddconfig(ddconfig)
        self.save_hyperparameters(ignore=["loss"])
        self.automatic_optimization = False
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = loss
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.image_key = image_key
        self.learning_rate = learning_rate
        self.disc_learning_rate = learning_rate if disc_learning_rate is None else disc_learning_rate
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.sample_every_n_steps = sample_every_n_steps
        self.num_sample_images = num_sample_images
        self._ch_mult = tuple(ddconfig.get("ch_mult", (1, 2, 4, 8)))
        self.channels_last = channels_last

    # ------------------------------------------------------------------------------------------ the model

    @property
    def downsampling_factor(self) -> int:
        """Spatial factor f between image and latent: 2 ** (len(ch_mult) − 1)."""
        return 2 ** (len(self._ch_mult) - 1)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last activations when enabled: oneDNN's bf16 convolutions on CPU (like cuDNN's tensor-core
        ones) work in NHWC and reorder NCHW inputs at every conv: bf16 decoding at 256 px ran at 0.35× of diffusers'
        speed, 1.02× with this (``python scripts/bench.py --only vae``). Off by default: at 32 px it is slower.
        Results are returned in the default layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] → posterior over latents (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(self._layout(x))).contiguous()  # (B, 2·embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) → images (B, 3, h·f, w·f)."""
        z = z.to(self.post_quant_conv.weight.dtype)  # the posterior is fp32; a half model takes half latents
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); the latent is a posterior sample, or its mode."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def get_input(self, batch: dict) -> torch.Tensor:
        """The batch's images (B, 3, H, W) in [-1, 1]."""
        return batch[self.image_key].float().contiguous(memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------------------------------ training

    def _require_loss(self) -> nn.Module:
        if self.loss is None:
            raise RuntimeError("this AutoencoderKL was built without `loss` (inference only); give it an "
                               "LPIPSWithDiscriminator to train")
        return self.loss

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """Adam(β 0.5, 0.9) for the autoencoder (+ logvar if learned) with its LR schedule; Adam for the discriminator."""
        loss = self._require_loss()
        ae_params = [p for m in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv) for p in m.parameters()]
        if loss.logvar.requires_grad:
            ae_params.append(loss.logvar)
        disc_params = list(loss.discriminator.parameters())
        opt_ae = torch.optim.Adam(ae_params, lr=self.learning_rate, betas=ADAM_BETAS, fused=fused_supported(ae_params))
        opt_disc = torch.optim.Adam(disc_params, lr=self.disc_learning_rate, betas=ADAM_BETAS,
                                    fused=fused_supported(disc_params))
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self.lr_schedule == "cosine" else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(opt_ae, partial(lr_factor, warmup=self.warmup_steps, total=total))
        return [opt_ae, opt_disc], [schedule]

    def _step_uncounted(self, optimizer: Any) -> None:
        """Step an optimiser through the precision plugin (autocast, GradScaler unscale/step/update) without
        LightningOptimizer's progress hooks, so it does not advance ``global_step``."""
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One autoencoder step, then (from disc_start on) one discriminator step; global_step += 1."""
        loss = self._require_loss()
        opt_ae, opt_disc = self.optimizers()
        step = self.global_step  # the step this batch trains; read before opt_ae.step() advances it
        x = self.get_input(batch)
        recon, posterior = self(x)

        with self.toggled_optimizer(opt_ae):  # no gradients into the discriminator from the generator loss
            ae_loss, log = loss(x, recon, posterior, 0, step, last_layer=self.get_last_layer(), split="train")
            opt_ae.zero_grad(set_to_none=True)
            self.manual_backward(ae_loss)
            opt_ae.step()
        self.lr_schedulers().step()

        if loss.discriminator_active(step):
            d_loss, log_d = loss(x, recon.detach(), posterior, 1, step, split="train")
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._step_uncounted(opt_disc)
            log.update(log_d)

        self.log("train/rec_loss", log.pop("train/rec_loss"), prog_bar=True, batch_size=x.shape[0])
        log["train/lr"] = torch.tensor(opt_ae.param_groups[0]["lr"])
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self._maybe_save_samples(x)
        return ae_loss.detach()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Reconstruct from the posterior mode; log the losses and ``val/psnr``."""
        loss = self._require_loss()
        x = self.get_input(batch)
        recon, posterior = self(x, sample_posterior=False)
        step = self.global_step
        _, log = loss(x, recon, posterior, 0, step, split="val")
        if loss.discriminator_active(step):
            log.update(loss(x, recon, posterior, 1, step, split="val")[1])
        self.log("val/psnr", psnr(recon, x).mean(), prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log_dict(log, batch_size=x.shape[0], sync_dist=True)

    @torch.no_grad()
    def _maybe_save_samples(self, x: torch.Tensor) -> None:
        every = self.sample_every_n_steps
        if every <= 0 or self.global_step % every != 0 or not self.trainer.is_global_zero:
            return
        inputs = x[: self.num_sample_images]
        recon, _ = self(inputs, sample_posterior=False)
        path = Path(self.trainer.default_root_dir) / SAMPLES_DIR / f"vae-step{self.global_step}.png"
        save_image_atomic(image_grid([inputs, recon]), path)
