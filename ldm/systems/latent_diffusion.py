"""Stage 2: a thin LightningModule that trains the U-Net on cached latents (latent-diffusion's LatentDiffusion).

Attribute names follow the original so a full state dict reads ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` and ``model_ema.*``, as Stable Diffusion's do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import torch
from torch import nn

from ldm.conditioning.base import ucg_dropout
from ldm.diffusion import NoiseSchedule, diffusion_loss
from ldm.ema import LitEma, ema_scope
from ldm.optim import fused_supported
from ldm.torch_compile import compile_network, is_compiled

LRDecay = Literal["constant", "cosine"]
VAL_NOISE_SEED = 1234  # validation loss uses the same t and ε every time, so curves are comparable
SAMPLES_DIR = "samples"


class DiffusionWrapper(nn.Module):
    """Holds the U-Net as ``diffusion_model`` (the name SD checkpoints use) and calls it."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The network's output for VP latents ``x`` at timesteps ``t``."""
        return self.diffusion_model(x, t, context=context, **kwargs)


class LatentDiffusion(L.LightningModule):
    """U-Net + conditioning + noise schedule; the frozen VAE decodes validation samples.

    ``compile: true`` torch.compiles the trained networks in place when training starts (keys unchanged).
    """

    def __init__(
        self,
        unet: nn.Module,
        cond_stage: nn.Module,
        schedule: NoiseSchedule,
        first_stage: str | nn.Module | None = None,
        parameterization: Literal["eps", "v", "x0"] = "eps",
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        ucg_rate: float = 0.1,
        cond_stage_trainable: bool = True,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: LRDecay = "constant",
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        scale_factor: float | None = None,
        image_size: int | None = None,
        sample_every_n_steps: int = 0,
        sample_conditions: Sequence | None = None,
        sample_steps: int = 50,
        sample_guidance: float = 4.0,
        sample_sampler: str = "ddim",
        compile: bool = False,
    ):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = cond_stage
        self.schedule = schedule
        self.first_stage_model = self._load_first_stage(first_stage)
        self.cond_stage_model.requires_grad_(cond_stage_trainable)
        self.cond_stage_trainable = cond_stage_trainable
        self.model_ema = LitEma(self.model, decay=ema_decay) if use_ema else None
        # Measured per cache (1 / std of the latents) unless given; stored so a checkpoint is self-contained.
        self.register_buffer("scale_factor", torch.tensor(scale_factor if scale_factor else math.nan))
        self.register_buffer("image_size", torch.tensor(image_size or 0))
        self.loss_options = dict(parameterization=parameterization, weighting=loss_weighting,
                                 min_snr_gamma=min_snr_gamma, offset_noise=offset_noise)
        self.parameterization = parameterization
        self.ucg_rate = ucg_rate
        self.optim = dict(lr=learning_rate, weight_decay=weight_decay, warmup=warmup_steps, decay=lr_decay)
        self.sampling = dict(every=sample_every_n_steps, conditions=list(sample_conditions or []),
                             steps=sample_steps, guidance=sample_guidance, sampler=sample_sampler)
        self.compile_networks = compile

    @staticmethod
    def _load_first_stage(spec: str | nn.Module | None) -> nn.Module | None:
        """A stage-1 run or checkpoint path is loaded (frozen); a module (an SD config's VAE) is used as is."""
        if spec is None or isinstance(spec, nn.Module):
            return spec.eval().requires_grad_(False) if spec is not None else None
        from ldm.autoencoder.load import load_autoencoder  # stage-1 code only when a VAE is named

        vae, _ = load_autoencoder(spec)
        return vae

    # ------------------------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        """Take the scale factor and image size from the latent cache the data module reads."""
        meta = getattr(getattr(self.trainer.datamodule, "train_dataset", None), "meta", None) or {}
        if torch.isnan(self.scale_factor) and "scale_factor" in meta:
            self.scale_factor.fill_(meta["scale_factor"])
        if not int(self.image_size) and meta.get("image_size"):
            self.image_size.fill_(int(meta["image_size"][-1]))
        if torch.isnan(self.scale_factor):
            raise ValueError("scale_factor is unknown: train on a latent cache (which measures it) or set it in the config")
        if self.compile_networks:
            for network in self.trained_networks():
                if not is_compiled(network):
                    compile_network(network, self.device)

    def trained_networks(self) -> list[nn.Module]:
        """The networks a training step runs forward and backward (what ``compile: true`` compiles)."""
        return [self.model.diffusion_model]

    def latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z·scale_factor: sampled from the cached posterior, or encoded on the fly from images."""
        if "mean" in batch:
            mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
        else:
            with torch.no_grad():
                z = self.first_stage_model.encode(batch["image"]).sample()
        return z * self.scale_factor

    def conditioning(self, batch: dict, drop: bool) -> torch.Tensor:
        """Cross-attention context (B, T, D) for the batch, with CFG dropout when ``drop``."""
        cond = batch[self.cond_stage_model.key]
        if drop and self.ucg_rate > 0:
            cond = ucg_dropout(cond, self.cond_stage_model.null_condition(len(cond)), self.ucg_rate)
        return self.cond_stage_model(cond)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Latents → conditioning (with CFG dropout) → diffusion loss → log."""
        z = self.latents(batch)
        loss = diffusion_loss(self.model, z, self.schedule, cond={"context": self.conditioning(batch, drop=True)},
                              **self.loss_options)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then update the EMA (before any checkpoint of this step is written)."""
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema(self.model)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Every N steps, draw a sample grid."""
        every = self.sampling["every"]
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_samples()

    def on_validation_epoch_start(self) -> None:
        """Validate with the EMA weights swapped in."""
        self._val_generator = torch.Generator(self.device).manual_seed(VAL_NOISE_SEED)
        self._ema_context = ema_scope(self.model, self.model_ema)
        self._ema_context.__enter__()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The loss on held-out latents, with fixed noise."""
        g = self._val_generator
        z = self.latents(batch, generator=g)
        loss = diffusion_loss(self.model, z, self.schedule, cond={"context": self.conditioning(batch, drop=False)},
                              generator=g, **self.loss_options)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(z))

    def on_validation_epoch_end(self) -> None:
        """Swap the training weights back."""
        self._ema_context.__exit__(None, None, None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the U-Net (and a trainable text encoder)."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        """AdamW over ``trainable_parameters`` with linear warm-up, then constant or cosine."""
        return self.make_optimizer(self.trainable_parameters())

    def make_optimizer(self, params: list[nn.Parameter]) -> dict:
        """AdamW over ``params`` with linear warm-up, then constant or cosine decay (stepped per batch)."""
        opt = torch.optim.AdamW(params, lr=self.optim["lr"], weight_decay=self.optim["weight_decay"],
                                fused=fused_supported(params))
        warmup, decay = self.optim["warmup"], self.optim["decay"]
        total = max(self.trainer.max_steps, 1) if self.trainer and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if decay == "cosine" and total:
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def log_samples(self) -> Path | None:
        """Draw a grid for the configured prompts / labels with the EMA weights into ``samples/``."""
        conditions = self.sampling["conditions"]
        if not conditions or self.first_stage_model is None:
            return None
        from ldm.images import image_grid, save_image_atomic
        from ldm.pipeline import Pipeline

        was_training = self.training
        self.eval()
        with ema_scope(self.model, self.model_ema):
            images = Pipeline.from_system(self).generate_tensors(
                conditions, steps=self.sampling["steps"], guidance=self.sampling["guidance"],
                sampler=self.sampling["sampler"], seed=0)
        self.train(was_training)
        out = Path(self.trainer.default_root_dir) / SAMPLES_DIR / f"ldm-step{self.global_step:07d}.png"
        save_image_atomic(image_grid([images], ncol=min(len(images), 8)), out)
        out.with_suffix(".txt").write_text("\n".join(map(str, conditions)) + "\n")
        return out
