"""ControlNet on Stable Diffusion: a ControlLDM node from any SD node, a ControlNet from an SD U-Net, the
model function that samples with a hint.

``with_control_stage`` turns a model node into a ControlLDM node (``ldm.systems.controlnet``) whose ControlNet
copies the U-Net's architecture; ``controlnet_from_sd`` and ``control_from_unet_state`` initialise a ControlNet
from the U-Net as ControlNet's ``tool_add_control.py`` does; ``sampling_model`` is what the samplers call.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn

from ldm.core.config import ConfigError
from ldm.io.checkpoints import CONTROL_PREFIX, UNET_PREFIX
from ldm.nets.autoencoder.model import downsampling_factor
from ldm.nets.controlnet import (
    COPIED_FROM_UNET,
    ControlledDiffusion,
    ControlNet,
    make_hint_block,
)
from ldm.systems.controlnet import DEFAULT_HINT_CHANNELS
from ldm.systems.latent_diffusion import LatentDiffusion

CONTROL_TARGET = "ldm.systems.controlnet.ControlLDM"
CONTROLNET_TARGET = "ldm.nets.controlnet.ControlNet"
HINT_BLOCK = "input_hint_block."
ZERO_INITIALISED = ("zero_convs.", "middle_block_out.")  # ControlNet's zero convolutions


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
    latent = params["unet"]["params"].get("out_channels")
    if latent is not None:  # the ControlNet reads the noisy latents alone (an inpainting U-Net also takes 5 more)
        unet["in_channels"] = latent
    ddconfig = (params["first_stage"].get("params") or {}).get("ddconfig")
    if not ddconfig:
        raise ConfigError("model.params.first_stage.params.ddconfig is needed to size the ControlNet's hint block")
    control = {"target": CONTROLNET_TARGET,
               "params": {**unet, "hint_channels": hint_channels, "downsampling_factor": downsampling_factor(ddconfig)}}
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
