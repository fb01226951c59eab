"""The KL-VAE objective: L1 + LPIPS as a Laplace NLL with a learned scale, + KL, + a PatchGAN with adaptive weight.

Semantics follow latent-diffusion's ``LPIPSWithDiscriminator`` (``ldm/modules/losses/contperceptual.py``):

    rec  = pixelloss_weight·|x − x̂| + perceptual_weight·LPIPS(x, x̂)            (B, C, H, W)
    nll  = Σ (rec / exp(logvar) + logvar) / B
    kl   = Σ KL(q(z|x) ‖ N(0, I)) / B
    L_G  = nll + kl_weight·kl + λ·disc_factor·(−E[D(x̂)]),   λ = disc_weight·‖∇_last nll‖ / (‖∇_last L_adv‖ + 1e-4)
    L_D  = disc_factor·hinge(D(x), D(x̂))

Unlike latent-diffusion, which multiplies the GAN terms by zero before ``disc_start``, the discriminator here
does no work at all until then: callers ask :meth:`LPIPSWithDiscriminator.discriminator_active` and skip
its step; the generator loss does not run it. ``pixelloss_weight`` is applied (LDM stores but ignores it).
``disc_start`` is a step, or a fraction of the run in [0, 1) (``0.75``: the last quarter), resolved by
:meth:`LPIPSWithDiscriminator.set_run_length` when the fit starts; a start at or beyond the run's end is warned about.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import VGG16_Weights

from ldm.core.errors import UserError
from ldm.nets.autoencoder.discriminator import (
    D_LOSSES,
    NLayerDiscriminator,
    adopt_weight,
)
from ldm.nets.autoencoder.distributions import DiagonalGaussianDistribution

log = logging.getLogger(__name__)
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4
VGG16_URL = VGG16_Weights.IMAGENET1K_V1.url  # the backbone lpips loads (through torchvision)
VGG16_FILE = VGG16_URL.rsplit("/", 1)[-1]  # vgg16-397923af.pth
VGG16_HASH_PREFIX = torch.hub.HASH_REGEX.search(VGG16_FILE).group(1)  # what torchvision checks the download against


class PerceptualWeightsUnavailable(UserError, RuntimeError):
    """LPIPS's VGG16 backbone weights are neither cached nor downloadable."""


def vgg16_weights_path() -> Path:
    """Where torch hub (and so lpips, through torchvision) looks for the VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def fetch_vgg16_weights(path: Path) -> None:
    """Download the VGG16 weights into torch hub's cache unless they are there, hash-checked as torchvision does (so
    an offline machine fails before lpips builds the 138M-parameter network it would load them into)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(path), hash_prefix=VGG16_HASH_PREFIX)


def build_lpips() -> nn.Module:
    """lpips.LPIPS(net="vgg"), frozen; a clear error when the VGG16 backbone cannot be fetched (offline)."""
    import lpips

    path = vgg16_weights_path()
    try:
        fetch_vgg16_weights(path)
        net = lpips.LPIPS(net="vgg", verbose=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated file a RuntimeError
        raise PerceptualWeightsUnavailable(
            f"The LPIPS perceptual loss needs torchvision's VGG16 weights, which could not be fetched ({e}). "
            f"Download {VGG16_URL} on a machine with network access and "
            f"place it at {path} (torch hub's cache: torch.hub.get_dir()/checkpoints/{VGG16_FILE}), or train "
            "without the perceptual term: set `perceptual_weight: 0` in the loss config "
            "(override: model.params.loss.params.perceptual_weight=0)."
        ) from e
    net.eval().requires_grad_(False)
    return net


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """disc_weight · ‖∇_last nll‖ / (‖∇_last g‖ + 1e-4), clamped to [0, 1e4] and detached (VQGAN eq. 7)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + ADAPTIVE_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_MAX).detach() * disc_weight


class LPIPSWithDiscriminator(nn.Module):
    """latent-diffusion's VAE loss; ``forward(..., optimizer_idx=0)`` → generator loss, ``1`` → discriminator loss."""

    def __init__(self, disc_start: int | float, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False,
                 disc_loss: Literal["hinge", "vanilla"] = "hinge", disc_ndf: int = 64, learn_logvar: bool = False):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.kl_weight, self.pixel_weight, self.perceptual_weight = kl_weight, pixelloss_weight, perceptual_weight
        self.perceptual_loss = build_lpips() if perceptual_weight > 0 else None
        # LDM keeps logvar fixed at logvar_init (it is not in its optimiser); learn_logvar=True trains it.
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=learn_logvar)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        if disc_start < 0 or (isinstance(disc_start, float) and disc_start >= 1 and not disc_start.is_integer()):
            raise ValueError(f"disc_start must be a step (an integer ≥ 0) or a fraction of the run in [0, 1), "
                             f"got {disc_start}")
        self.disc_start = disc_start
        fraction = isinstance(disc_start, float) and disc_start < 1
        self.discriminator_iter_start: int | None = None if fraction else int(disc_start)
        self.disc_loss = D_LOSSES[disc_loss]
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_conditional = disc_conditional

    def train(self, mode: bool = True) -> "LPIPSWithDiscriminator":
        """As nn.Module.train, but the frozen LPIPS network stays in eval mode (no dropout)."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def set_run_length(self, total_steps: int | None) -> None:
        """Resolve a fractional ``disc_start`` against the run's steps; warn when the discriminator would never start."""
        if isinstance(self.disc_start, float) and self.disc_start < 1:
            if total_steps is None:
                raise ValueError(f"disc_start={self.disc_start} is a fraction of the run, but the run's length is "
                                 "unknown: set trainer.max_steps, or give disc_start as a step")
            self.discriminator_iter_start = round(self.disc_start * total_steps)
        if total_steps is not None and self.discriminator_iter_start >= total_steps:
            log.warning("disc_start=%s is at or beyond the run's end (%d steps): the discriminator never trains; "
                        "set model.params.loss.params.disc_start below trainer.max_steps, or as a fraction of the "
                        "run (e.g. 0.75)", self.disc_start, total_steps)

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at this step (global_step ≥ disc_start)."""
        start = self.discriminator_iter_start
        return start is not None and global_step >= start  # None: a fraction not resolved yet (no fit started)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posteriors: DiagonalGaussianDistribution, optimizer_idx: int, global_step: int,
                last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None, split: str = "train",
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, log) for the autoencoder (optimizer_idx 0) or the discriminator (1); log keys ``{split}/…``."""
        if optimizer_idx == 0:
            return self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, cond, split, weights)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.disc_conditional:
            if cond is None:
                raise ValueError("disc_conditional=True needs `cond` (concatenated to the discriminator's input)")
            x = torch.cat((x, cond), dim=1)
        return self.discriminator(x.contiguous())  # (B, 1, h, w)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       posteriors: DiagonalGaussianDistribution, global_step: int,
                       last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                       split: str = "train", weights: torch.Tensor | None = None):
        """Autoencoder loss: NLL + kl_weight·KL (+ the adaptively weighted GAN term once the discriminator is on)."""
        inputs, reconstructions = inputs.float(), reconstructions.float()
        rec_loss = self.pixel_weight * (inputs - reconstructions).abs()  # (B, C, H, W)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous()).float()  # (B, 1, 1, 1)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll = rec_loss / torch.exp(self.logvar) + self.logvar
        batch = nll.shape[0]
        nll_loss = nll.sum() / batch
        weighted_nll_loss = (nll * weights).sum() / batch if weights is not None else nll_loss
        kl_loss = posteriors.kl().sum() / batch
        loss = weighted_nll_loss + self.kl_weight * kl_loss

        zero = nll_loss.new_zeros(())
        g_loss, d_weight, disc_factor = zero, zero, 0.0
        if self.discriminator_active(global_step):
            disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
            g_loss = -self._discriminate(reconstructions, cond).float().mean()
            if disc_factor > 0 and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
            loss = loss + d_weight * disc_factor * g_loss

        log = {
            "total_loss": loss, "logvar": self.logvar, "kl_loss": kl_loss, "nll_loss": nll_loss,
            "rec_loss": rec_loss.mean(), "d_weight": d_weight, "disc_factor": nll_loss.new_tensor(float(disc_factor)),
            "g_loss": g_loss,
        }
        return loss, {f"{split}/{k}": v.detach().float() for k, v in log.items()}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: torch.Tensor | None = None, split: str = "train"):
        """Discriminator loss on real inputs vs detached reconstructions; only valid once it is active."""
        if not self.discriminator_active(global_step):
            raise RuntimeError(
                f"the discriminator is off until disc_start={self.discriminator_iter_start} (step {global_step}); "
                "check discriminator_active(step) and skip its step"
            )
        logits_real = self._discriminate(inputs.detach(), cond).float()
        logits_fake = self._discriminate(reconstructions.detach(), cond).float()
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach() for k, v in log.items()}
