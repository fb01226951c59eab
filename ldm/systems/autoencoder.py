"""Stage 1: the KL-VAE trained as a thin LightningModule (the network is ``ldm.nets.autoencoder.model``, the
loss math ``ldm.nets.autoencoder.losses``).

``AutoencoderKLSystem`` *is* an AutoencoderKL (same state-dict keys, ``encoder.*``, ``decoder.*``, … as
latent-diffusion's, plus ``loss.*``), so a stage-1 checkpoint reads like latent-diffusion's kl-f8 files.

Training uses Lightning 2 manual optimisation with two optimisers (autoencoder, discriminator), both from the
``optimizer`` node (``ldm.systems.optim.AdamW``, latent-diffusion's betas 0.5, 0.9; the discriminator at ``disc_lr``).
``trainer.global_step`` counts generator steps, i.e. batches: the discriminator is stepped through the
strategy's precision plugin directly (same autocast / GradScaler handling as ``LightningOptimizer.step``)
but without the progress bookkeeping that would count it as a second step. Before ``disc_start`` the
discriminator does no work at all: no forward, no backward, no optimiser step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ldm.core.metrics import psnr
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.systems.optim import AdamW, total_steps

ADAM_BETAS = (0.5, 0.9)  # latent-diffusion's VAE / VQGAN optimiser betas
DEFAULT_LR = 4.5e-6  # latent-diffusion's base rate for its KL autoencoders


class AutoencoderKLSystem(AutoencoderKL, L.LightningModule):
    """An AutoencoderKL that trains with an LPIPSWithDiscriminator (``loss``; None: inference only)."""

    def __init__(self, ddconfig: dict, embed_dim: int, loss: nn.Module | None = None, optimizer: AdamW | None = None,
                 image_key: str = "image", disc_lr: float | None = None, channels_last: bool = False,
                 bicubic_skip: bool = False):
        super().__init__(ddconfig, embed_dim, channels_last, bicubic_skip)
        self.save_hyperparameters(ignore=["loss", "optimizer"])
        self.automatic_optimization = False
        self.loss = loss
        self.image_key = image_key
        self.optimizer_settings = optimizer or AdamW(lr=DEFAULT_LR, betas=ADAM_BETAS)
        self.disc_lr = self.optimizer_settings.lr if disc_lr is None else disc_lr

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
        """The configured optimiser for the autoencoder (+ logvar if learned) with its LR schedule, and for the
        discriminator at ``disc_lr``."""
        loss = self._require_loss()
        ae_params = [p for m in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv) for p in m.parameters()]
        if loss.logvar.requires_grad:
            ae_params.append(loss.logvar)
        disc_params = list(loss.discriminator.parameters())
        opt_ae = self.optimizer_settings.optimizer(ae_params)
        opt_disc = self.optimizer_settings.optimizer(disc_params, lr=self.disc_lr)
        return [opt_ae, opt_disc], [self.optimizer_settings.schedule(opt_ae, total_steps(self.trainer))]

    def on_fit_start(self) -> None:
        """Resolve the loss's disc_start against the run's length (a fraction of it, or a warning past its end)."""
        if self.loss is not None:
            self.loss.set_run_length(total_steps(self.trainer))

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
