"""Stage 3: ControlNet trained on a frozen latent diffusion model (ControlNet's ``cldm.ControlLDM``).

Attribute names follow the original, so a full state dict reads ``model.diffusion_model.*`` (the base U-Net),
``control_model.*`` (the ControlNet), ``cond_stage_model.*`` and ``first_stage_model.*``. The system is built
from modules; the base's weights (a stage-2 run's EMA weights, or a Stable Diffusion file) are loaded into it
by the stage-3 preparation (``ldm.training.controlnet_base``), never by the system itself. The base U-Net is
frozen (``requires_grad_(False)``: no gradients are computed for it); ``sd_locked: false`` also trains its
output blocks and ``out``. Only those and the ControlNet are optimised. The same class is the inference model
of ``configs/sd/controlnet-v1.yaml``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from functools import partial

import torch
from torch import Tensor, nn

from ldm.diffusion import DiffusionObjective
from ldm.nets.conditioning.base import ucg_dropout
from ldm.nets.compile import Compile
from ldm.nets.controlnet import ControlNet, controlled_forward
from ldm.nets.ema import EMA, ema_scope
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.systems.optim import AdamW

DEFAULT_HINT_CHANNELS = 3  # ControlNet's RGB hint images (Canny edges as 3 equal channels)
UNLOCKED_WHEN_NOT_SD_LOCKED = ("output_blocks", "out")  # the U-Net's decoder half, trained with sd_locked: false


class ControlLDM(LatentDiffusion):
    """LatentDiffusion + ``control_model`` (a ControlNet fed a hint); trains only the ControlNet.

    Beyond LatentDiffusion's parameters: ``control_stage`` (the ControlNet; None: one shaped like the U-Net with
    ``hint_channels`` in, for the VAE's factor), ``control_key`` (the batch field of the hint), ``hint_ucg_rate``
    (share of training hints replaced by an empty one), ``only_mid_control``, ``control_scales`` (one per
    residual, default all 1), ``sd_locked``; ``base`` / ``base_ckpt`` + ``base_config`` record where the frozen
    model came from. ``ema`` (an ``ldm.nets.ema.EMA``) keeps an EMA of the trained weights (``control_ema``, and ``model_ema`` for an
    unlocked decoder); off by default, as in ControlNet.
    """

    def __init__(self, unet: nn.Module | None = None, cond_stage: nn.Module | None = None,
                 objective: DiffusionObjective | None = None, control_stage: nn.Module | None = None, first_stage: nn.Module | None = None,
                 ucg_rate: float = 0.1, hint_ucg_rate: float = 0.0, control_key: str = "hint",
                 only_mid_control: bool = False, control_scales: list[float] | None = None, sd_locked: bool = True,
                 hint_channels: int = DEFAULT_HINT_CHANNELS, cond_stage_trainable: bool = False,
                 optimizer: AdamW | None = None, ema: EMA | None = None,
                 scale_factor: float | None = None, image_size: int | None = None, compile: Compile | None = None,
                 base: str | None = None, base_ckpt: str | None = None, base_config: str | None = None):
        missing = [n for n, v in (("unet", unet), ("cond_stage", cond_stage), ("objective", objective)) if v is None]
        if missing:
            raise ValueError(f"{missing[0]} is not set: give the architecture, or a base (base: runs/ldm/<run>, or "
                             "base_ckpt + base_config) and fill it in with "
                             "ldm.training.controlnet_base.complete_model_node (stages/train_controlnet.py does)")
        if not 0.0 <= hint_ucg_rate <= 1.0:
            raise ValueError(f"hint_ucg_rate must be in [0, 1], got {hint_ucg_rate}")
        super().__init__(unet, cond_stage, objective, first_stage, ucg_rate, cond_stage_trainable, optimizer,
                         ema=None, scale_factor=scale_factor, image_size=image_size,
                         compile=compile)
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
        self.base_source = dict(base=base, base_ckpt=base_ckpt, base_config=base_config)
        self._freeze_base()
        # EMAs of what trains: the ControlNet, and in `model_ema` (public naming) the U-Net's unlocked decoder
        self.ema = ema
        self.model_ema = ema.track(self.model) if ema is not None else None
        self.control_ema = ema.track(self.control_model) if ema is not None else None

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

    def trained_networks(self) -> list[nn.Module]:
        """The ControlNet and the U-Net it feeds (gradients flow back through the U-Net's decoder)."""
        return [self.control_model, self.model.diffusion_model]

    # ------------------------------------------------------------------------------------ training

    def network(self) -> partial:
        """``network(x_t, t, context, hint)``: the U-Net with the ControlNet's residuals (× ``control_scales``)."""
        scales = self.control_scales if self.control_scales is not None else 1.0
        return partial(controlled_forward, self.model.diffusion_model, self.control_model, scales=scales,
                       only_mid_control=self.only_mid_control)

    def hint(self, batch: dict, drop: bool) -> Tensor:
        """The batch's hints (B, 3, H, W) in [0, 1], a share ``hint_ucg_rate`` zeroed when ``drop``."""
        if self.control_key not in batch:
            raise KeyError(f"the batch has no {self.control_key!r}: train on a latent cache built with hints "
                           "(ShapesDataset hint: true, ImageFolderDataset hint_dir)")
        hint = batch[self.control_key].to(self.device)
        if drop and self.hint_ucg_rate > 0:
            hint = ucg_dropout(hint, torch.zeros_like(hint), self.hint_ucg_rate)
        return hint

    def conditioning(self, batch: dict, drop: bool) -> dict:
        """Context (B, T, D) with CFG dropout, and the hint (with its own dropout) when ``drop``."""
        return {**super().conditioning(batch, drop), "hint": self.hint(batch, drop)}

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

    def ema_weights(self) -> AbstractContextManager:
        """Context manager: the EMA weights (ControlNet and unlocked decoder) swapped in, when kept."""
        stack = ExitStack()
        stack.enter_context(ema_scope(self.model, self.model_ema))
        stack.enter_context(ema_scope(self.control_model, self.control_ema))
        return stack
