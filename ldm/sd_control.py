"""ControlNet on Stable Diffusion: the ControlLDM system, a ControlNet from an SD U-Net, sampling with a hint.

``ControlLDM`` (``ldm.systems.controlnet``, re-exported here) is LatentDiffusion plus ``control_model``
(state-dict prefix ``control_model.``), built from ``configs/sd/controlnet-v1.yaml`` or from any SD config by
``with_control_stage``. ``controlnet_from_sd`` and
``control_from_unet_state`` initialise a ControlNet from the U-Net as ControlNet's ``tool_add_control.py``
does; ``ControlledDiffusion`` is the model function the samplers call with a hint; ``load_control_image``
reads a hint image (an edge map, or a photo to run Canny on) for the CLI.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from ldm.checkpoints import CONTROL_PREFIX, UNET_PREFIX
from ldm.config import ConfigError
from ldm.data.edges import edge_hint, hint_from_image
from ldm.errors import UserError
from ldm.systems.controlnet import DEFAULT_HINT_CHANNELS, ControlLDM, ControlledDiffusion
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.unet.controlnet import COPIED_FROM_UNET, ControlNet, make_hint_block

__all__ = ["ControlImageError", "ControlLDM", "ControlledDiffusion", "control_from_unet_state", "controlnet_from_sd",
           "load_control_image", "sampling_model", "with_control_stage"]

CONTROL_TARGET = "ldm.systems.controlnet.ControlLDM"
CONTROLNET_TARGET = "ldm.unet.controlnet.ControlNet"
HINT_BLOCK = "input_hint_block."
ZERO_INITIALISED = ("zero_convs.", "middle_block_out.")  # ControlNet's zero convolutions


class ControlImageError(UserError, ValueError):
    """A control (hint) image that cannot be read or does not fit the requested size."""


def sampling_model(system: LatentDiffusion, strength: float = 1.0, guess_mode: bool = False) -> nn.Module:
    """The model function a Pipeline samples with: ``system.model``, or a ControlledDiffusion for a ControlLDM
    (its ``control_scales``, when trained with some, times ``strength``)."""
    control = getattr(system, "control_model", None)
    if control is None:
        return system.model
    trained = getattr(system, "control_scales", None)
    scales = [strength * s for s in trained] if trained is not None else strength
    return ControlledDiffusion(system.model.diffusion_model, control, scales, guess_mode,
                               getattr(system, "only_mid_control", False))


def controlnet_from_sd(sd_model: LatentDiffusion, hint_channels: int = DEFAULT_HINT_CHANNELS) -> ControlNet:
    """A ControlNet shaped like the SD model's U-Net, its time embedding, input blocks and middle block copied
    from it (ControlNet's ``tool_add_control.py``); the hint block is fresh and the zero convs are zero."""
    unet = sd_model.model.diffusion_model
    factor = getattr(sd_model.first_stage_model, "downsampling_factor", None)
    if factor is None:
        raise ValueError("the SD model has no VAE (first_stage_model) to tell the hint's downsampling factor")
    return ControlNet.from_unet(unet, hint_channels=hint_channels, downsampling_factor=factor)


def with_control_stage(node: dict, hint_channels: int = DEFAULT_HINT_CHANNELS) -> dict:
    """An SD model node turned into a ControlLDM node whose ControlNet copies the U-Net's architecture."""
    if "control_stage" in (node.get("params") or {}):
        return node
    params = copy.deepcopy(node["params"])
    unet = {k: v for k, v in params["unet"]["params"].items() if k != "out_channels"}
    ch_mult = ((params["first_stage"].get("params") or {}).get("ddconfig") or {}).get("ch_mult")
    if not ch_mult:
        raise ConfigError("model.params.first_stage.params.ddconfig.ch_mult is needed to size the ControlNet's "
                          "hint block")
    control = {"target": CONTROLNET_TARGET,
               "params": {**unet, "hint_channels": hint_channels, "downsampling_factor": 2 ** (len(ch_mult) - 1)}}
    return {"target": CONTROL_TARGET, "params": {**params, "control_stage": control}}


def control_from_unet_state(control: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``control_model.*`` as ``tool_add_control.py`` makes it: the U-Net's blocks, a fresh hint block, zero convs."""
    out, fresh_hint = {}, None
    for key, own in control.state_dict().items():
        unet_key = UNET_PREFIX + key
        if key.split(".")[0] in COPIED_FROM_UNET and unet_key in state:
            out[CONTROL_PREFIX + key] = state[unet_key].detach().clone()  # its own tensor: trained apart from the U-Net
        elif key.startswith(ZERO_INITIALISED):
            out[CONTROL_PREFIX + key] = torch.zeros(own.shape)
        elif key.startswith(HINT_BLOCK):
            if fresh_hint is None:  # built for real (the control model itself may be on the meta device)
                fresh_hint = make_hint_block(control.hint_channels, control.model_channels,
                                             control.downsampling_factor).state_dict()
            out[CONTROL_PREFIX + key] = fresh_hint[key[len(HINT_BLOCK):]]
    return out


def load_control_image(path: str | os.PathLike, height: int | None = None, width: int | None = None,
                       multiple: int = 8, canny: bool = False) -> Tensor:
    """A hint image as ControlNet takes it: (1, 3, H, W) in [0, 1] (white edges on black for Canny models).

    ``path`` is the hint itself (an edge map, e.g. from scripts/make_edges.py) or, with ``canny``, a photo
    whose Canny edges are taken (after resizing, as ControlNet's annotator does). It is resized to
    ``height`` × ``width`` when given, else cut down to a multiple of ``multiple`` (the VAE's factor).
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ControlImageError(f"cannot read the control image {path}: {e}") from e
    w, h = image.size
    height = height or h - h % multiple
    width = width or w - w % multiple
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ControlImageError(f"control image size {height}×{width} must be a positive multiple of {multiple}")
    if (width, height) != (w, h):
        shrink = width * height < w * h
        image = image.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    hint = edge_hint(image) if canny else hint_from_image(image)  # (3, H, W) in [0, 1]
    return hint[None]  # (1, 3, H, W)
