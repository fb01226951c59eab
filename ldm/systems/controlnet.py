"""Stage 3: ControlNet trained on a frozen latent diffusion model (ControlNet's ``cldm.ControlLDM``).

Attribute names follow the original, so a full state dict reads ``model.diffusion_model.*`` (the base U-Net),
``control_model.*`` (the ControlNet), ``cond_stage_model.*`` and ``first_stage_model.*``. The base comes from
a stage-2 run (``base: runs/ldm/<run>``, its EMA weights) or a Stable Diffusion file (``base_ckpt`` +
``base_config``); ``ldm.systems.control_base`` fills the architecture in from it and loads its weights when
training starts. The base U-Net is frozen (``requires_grad_(False)``: no gradients are computed for it);
``sd_locked: false`` also trains its output blocks and ``out``. Only those and the ControlNet are optimised.
The same class is the inference model of ``configs/sd/controlnet-v1.yaml``.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ldm.conditioning.base import ucg_dropout
from ldm.diffusion import NoiseSchedule, cfg_denoiser, diffusion_loss, make_denoiser, sample
from ldm.ema import LitEma, ema_scope
from ldm.systems.latent_diffusion import SAMPLES_DIR, VAL_NOISE_SEED, LatentDiffusion
from ldm.unet.controlnet import ControlNet, apply_control_scales, copy_unet_weights, guess_mode_scales

DEFAULT_HINT_CHANNELS = 3  # ControlNet's RGB hint images (Canny edges as 3 equal channels)
UNLOCKED_WHEN_NOT_SD_LOCKED = ("output_blocks", "out")  # the U-Net's decoder half, trained with sd_locked: false
EMA_SOURCES = {"model_ema": "model.", "control_ema": "control_model."}  # EMA module → the weights it shadows
SAMPLE_SEED = 0
DEFAULT_EMA_DECAY = 0.9999
Scales = float | Sequence[float]


def controlled_forward(unet: nn.Module, control: nn.Module, x: Tensor, t: Tensor, context: Tensor | None,
                       hint: Tensor | None, scales: Scales = 1.0, only_mid_control: bool = False) -> Tensor:
    """The U-Net's output with the ControlNet's residuals × ``scales`` (one float or one per residual) added."""
    if hint is None:
        return unet(x, t, context=context)
    residuals = control(x, hint, t, context)  # len(input_blocks) + 1 tensors
    return unet(x, t, context=context, control=apply_control_scales(residuals, scales),
                only_mid_control=only_mid_control)


class ControlledDiffusion(nn.Module):
    """``model(x_t, t, context, hint)`` for the samplers: ControlNet residuals × strength added to the U-Net.

    Without a hint it is the plain U-Net. ``strength`` is one float or one per residual; ``guess_mode`` scales
    the residuals by 0.825^(n−1−i) on top (ControlNet's guess mode: the deepest residual full, the shallowest least).
    """

    def __init__(self, diffusion_model: nn.Module, control_model: nn.Module, strength: Scales = 1.0,
                 guess_mode: bool = False, only_mid_control: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.control_model = control_model
        self.strength = strength
        self.guess_mode = guess_mode
        self.only_mid_control = only_mid_control

    def scales(self, n: int) -> Scales:
        """The scale of each of ``n`` residuals (or one for all)."""
        if not self.guess_mode:
            return self.strength
        if isinstance(self.strength, (int, float)):
            return guess_mode_scales(n, float(self.strength))
        return [s * g for s, g in zip(self.strength, guess_mode_scales(n))]

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, hint: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), t (B,), context (B, T, D), hint (B, 3, f·h, f·w) in [0, 1] → (B, C, h, w)."""
        n = len(self.diffusion_model.input_blocks) + 1
        return controlled_forward(self.diffusion_model, self.control_model, x, t, context, hint, self.scales(n),
                                  self.only_mid_control)


class ControlLDM(LatentDiffusion):
    """LatentDiffusion + ``control_model`` (a ControlNet fed a hint); trains only the ControlNet.

    Takes LatentDiffusion's parameters plus: ``control_stage`` (the ControlNet; by default one shaped like the
    U-Net, ``hint_channels`` in, the VAE's factor), ``control_key`` (the batch field of the hint),
    ``only_mid_control``, ``control_scales`` (one per residual, default all 1), ``sd_locked``, ``hint_ucg_rate``
    (share of training hints replaced by an empty one), ``base`` / ``base_ckpt`` + ``base_config`` (where the
    frozen model comes from: loaded by ``load_base`` when training starts), ``sample_count`` (grid rows).
    ``use_ema`` keeps an EMA of the trained weights (``control_ema``, and ``model_ema`` for an unlocked decoder);
    off by default, as in ControlNet.
    """

    ema_sources = EMA_SOURCES  # for loaders that start the EMAs from the weights (ldm.sd.to_model_layout)

    def __init__(self, control_stage: nn.Module | None = None, control_key: str = "hint",
                 only_mid_control: bool = False, control_scales: list[float] | None = None, sd_locked: bool = True,
                 hint_ucg_rate: float = 0.0, hint_channels: int = DEFAULT_HINT_CHANNELS, base: str | None = None,
                 base_ckpt: str | None = None, base_config: str | None = None, use_ema: bool = False,
                 ema_decay: float = DEFAULT_EMA_DECAY, cond_stage_trainable: bool = False, sample_count: int = 4,
                 unet: nn.Module | None = None, cond_stage: nn.Module | None = None,
                 schedule: NoiseSchedule | None = None, **latent_diffusion_params):
        missing = [n for n, v in (("unet", unet), ("cond_stage", cond_stage), ("schedule", schedule)) if v is None]
        if missing:
            raise ValueError(f"{missing[0]} is not set: give the architecture, or a base (base: runs/ldm/<run>, or "
                             "base_ckpt + base_config) and fill it in with ldm.systems.control_base.complete_model_node "
                             "(stages/train_controlnet.py does)")
        if not 0.0 <= hint_ucg_rate <= 1.0:
            raise ValueError(f"hint_ucg_rate must be in [0, 1], got {hint_ucg_rate}")
        super().__init__(unet=unet, cond_stage=cond_stage, schedule=schedule, use_ema=False, ema_decay=ema_decay,
                         cond_stage_trainable=cond_stage_trainable, **latent_diffusion_params)
        self.control_model = control_stage if control_stage is not None else self._default_control(hint_channels)
        n_residuals = len(self.control_model.zero_convs) + 1
        if control_scales is not None and len(control_scales) != n_residuals:
            raise ValueError(f"control_scales has {len(control_scales)} entries; this ControlNet has {n_residuals} "
                             "residuals (one per input block + the middle block)")
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.control_scales = list(control_scales) if control_scales is not None else None
        self.sd_locked = sd_locked
        self.hint_ucg_rate = hint_ucg_rate
        self.base = dict(base=base, base_ckpt=base_ckpt, base_config=base_config)
        self.sample_count = sample_count
        self._freeze_base()
        # EMAs of what trains: the ControlNet, and in `model_ema` (public naming) the U-Net's unlocked decoder
        self.model_ema = LitEma(self.model, ema_decay) if use_ema else None
        self.control_ema = LitEma(self.control_model, ema_decay) if use_ema else None
        self._restored = False

    def _default_control(self, hint_channels: int) -> ControlNet:
        """A ControlNet shaped like the U-Net (its encoder copied) for the VAE's downsampling factor."""
        factor = getattr(self.first_stage_model, "downsampling_factor", None)
        if factor is None:
            raise ValueError("control_stage is not set and there is no VAE (first_stage) to tell the hint's "
                             "downsampling factor: give control_stage")
        return ControlNet.from_unet(self.model.diffusion_model, hint_channels, factor)

    def _freeze_base(self) -> None:
        """No gradients for the base U-Net (and text encoder), except the decoder half when not ``sd_locked``."""
        unet = self.model.diffusion_model
        unet.requires_grad_(False)
        if not self.sd_locked:
            for name in UNLOCKED_WHEN_NOT_SD_LOCKED:
                getattr(unet, name).requires_grad_(True)
        self.control_model.requires_grad_(True)

    # ------------------------------------------------------------------------------------ the base

    def load_base(self) -> dict:
        """Load the frozen model from ``base`` (or ``base_ckpt``) and copy its encoder into the ControlNet."""
        from ldm.systems.control_base import load_base_weights  # reads runs and SD files: only when training starts

        info = load_base_weights(self, **self.base)
        copy_unet_weights(self.control_model, self.model.diffusion_model)
        self._restart_ema()
        return info

    @torch.no_grad()
    def _restart_ema(self) -> None:
        """Start the EMA shadows from the current weights."""
        for ema_name, source in EMA_SOURCES.items():
            ema = getattr(self, ema_name, None)
            if ema is None:
                continue
            tracked = self.get_submodule(source.rstrip("."))
            buffers = dict(ema.named_buffers())
            for name, shadow in ema.m_name2s_name.items():
                buffers[shadow].copy_(tracked.get_parameter(name))
            ema.reset_num_updates()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run has its weights: the base is not loaded again."""
        self._restored = True

    def on_fit_start(self) -> None:
        """Load the base (unless resuming), then take the scale factor from it (or the cache)."""
        if not self._restored and any(self.base.values()):
            self.load_base()
        super().on_fit_start()

    def trained_networks(self) -> list[nn.Module]:
        """The ControlNet and the U-Net it feeds (gradients flow back through the U-Net's decoder)."""
        return [self.control_model, self.model.diffusion_model]

    # ------------------------------------------------------------------------------------ training

    def apply_model(self, x: Tensor, t: Tensor, context: Tensor | None = None, hint: Tensor | None = None) -> Tensor:
        """The controlled U-Net's output, residuals scaled by ``control_scales``."""
        scales = self.control_scales if self.control_scales is not None else 1.0
        return controlled_forward(self.model.diffusion_model, self.control_model, x, t, context, hint, scales,
                                  self.only_mid_control)

    def hint(self, batch: dict, drop: bool) -> Tensor:
        """The batch's hints (B, 3, H, W) in [0, 1], a share ``hint_ucg_rate`` zeroed when ``drop``."""
        if self.control_key not in batch:
            raise KeyError(f"the batch has no {self.control_key!r}: train on a latent cache built with hints "
                           "(ShapesDataset hint: true, ImageFolderDataset hint_dir)")
        hint = batch[self.control_key].to(self.device)
        if drop and self.hint_ucg_rate > 0:
            hint = ucg_dropout(hint, torch.zeros_like(hint), self.hint_ucg_rate)
        return hint

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Latents → context (CFG dropout) + hint (optional dropout) → diffusion loss of the controlled model."""
        z = self.latents(batch)
        cond = {"context": self.conditioning(batch, drop=True), "hint": self.hint(batch, drop=True)}
        loss = diffusion_loss(self.apply_model, z, self.schedule, cond=cond, **self.loss_options)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then update the EMAs (before any checkpoint of this step is written)."""
        super().optimizer_step(*args, **kwargs)  # updates model_ema (an unlocked decoder)
        if self.control_ema is not None:
            self.control_ema(self.control_model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ControlNet's parameters, the U-Net's decoder half when not ``sd_locked``, a trainable text encoder."""
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += [p for name in UNLOCKED_WHEN_NOT_SD_LOCKED for p in getattr(unet, name).parameters()]
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        """AdamW over ``trainable_parameters`` with stage 2's warm-up and decay."""
        return self.make_optimizer(self.trainable_parameters())

    # ------------------------------------------------------------------------------------ validation

    def ema_weights(self):
        """Context manager: the EMA weights (ControlNet and unlocked decoder) swapped in, when kept."""
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(ema_scope(self.model, self.model_ema))
        stack.enter_context(ema_scope(self.control_model, self.control_ema))
        return stack

    def on_validation_epoch_start(self) -> None:
        """Validate with the EMA weights swapped in."""
        self._val_generator = torch.Generator(self.device).manual_seed(VAL_NOISE_SEED)
        self._ema_context = self.ema_weights()
        self._ema_context.__enter__()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The loss on held-out latents with fixed noise; the first batch also draws a sample grid."""
        g = self._val_generator
        z = self.latents(batch, generator=g)
        cond = {"context": self.conditioning(batch, drop=False), "hint": self.hint(batch, drop=False)}
        loss = diffusion_loss(self.apply_model, z, self.schedule, cond=cond, generator=g, **self.loss_options)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(z))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self.log_samples(batch, tag="val")

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Every N steps, a grid of the training batch's hints, samples and targets."""
        every = self.sampling["every"]
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            with self.ema_weights():
                self.log_samples(batch, tag="train")

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_latents(self, conditions: Sequence, hint: Tensor, steps: int, guidance: float, sampler: str,
                       seed: int = SAMPLE_SEED) -> Tensor:
        """Latents (B, C, h, w) for conditions and hints (B, 3, H, W), with CFG on the condition (the hint in both)."""
        b = len(conditions)
        factor = self.control_model.downsampling_factor
        shape = (self.model.diffusion_model.in_channels, hint.shape[-2] // factor, hint.shape[-1] // factor)
        context = self.cond_stage_model(conditions)  # (B, T, D)
        uncond = self.cond_stage_model(self.cond_stage_model.null_condition(b))
        noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        denoiser = cfg_denoiser(make_denoiser(self.apply_model, self.schedule, self.parameterization),
                                {"context": context, "hint": hint}, {"context": uncond, "hint": hint}, guidance,
                                rescale_space=self.parameterization)
        generator = torch.Generator(self.device).manual_seed(seed)
        return sample(sampler, denoiser, noise, self.schedule, steps, generator=generator).x

    @torch.no_grad()
    def log_samples(self, batch: dict | None = None, tag: str = "val") -> Path | None:
        """Write ``samples/controlnet-<tag>-step*.png``: one row per item, hint | generated | target."""
        if batch is None or self.first_stage_model is None or not self.sample_count:
            return None
        from ldm.images import image_grid, save_image_atomic

        n = min(self.sample_count, len(batch[self.control_key]))
        conditions = batch[self.cond_stage_model.key][:n]
        hint = self.hint(batch, drop=False)[:n]  # (n, 3, H, W) in [0, 1]
        was_training = self.training
        self.eval()
        z = self.sample_latents(conditions, hint, self.sampling["steps"], self.sampling["guidance"],
                                self.sampling["sampler"])
        generated = self.first_stage_model.decode(z / self.scale_factor).clamp(-1, 1)  # (n, 3, H, W)
        target = (batch["image"][:n] if "image" in batch
                  else self.first_stage_model.decode(batch["mean"][:n].to(self.device))).clamp(-1, 1)
        self.train(was_training)
        rows = torch.stack([hint * 2 - 1, generated, target], dim=1).flatten(0, 1)  # (3n, 3, H, W)
        out = Path(self.trainer.default_root_dir) / SAMPLES_DIR / f"controlnet-{tag}-step{self.global_step:07d}.png"
        save_image_atomic(image_grid([rows], ncol=3), out)
        labels = conditions.tolist() if torch.is_tensor(conditions) else list(conditions)
        out.with_suffix(".txt").write_text("hint | generated | target\n" + "\n".join(map(str, labels)) + "\n")
        return out


def _extend_signature(cls: type, base: type) -> None:
    """Give ``cls.__init__`` its own parameters followed by ``base``'s (keyword-only), with type hints, so
    the config checker validates every parameter name and type of a ``**kwargs`` pass-through."""
    own = inspect.signature(cls.__init__)
    own_params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own_params}
    base_params = inspect.signature(base.__init__).parameters
    inherited = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                 for name, p in base_params.items() if name != "self" and name not in taken]
    cls.__init__.__signature__ = own.replace(parameters=own_params + inherited)
    cls.__init__.__annotations__ = {**typing.get_type_hints(base.__init__), **typing.get_type_hints(cls.__init__)}


_extend_signature(ControlLDM, LatentDiffusion)
