"""One chunk of a checked request, drawn: conditioning → (control, edit inputs) → the sampling core → latents.

The conditioning is a dict of the network's keywords: ``{"context": …}`` from the conditioner, or whatever mapping
it returns (a conditioner with a vector ``y`` adds it by name; nothing here knows which keys a model takes).
Image-to-image encodes the init image with the VAE (the posterior mean, scaled), starts from it at the request's
strength and lets any sampler finish (``ldm.diffusion.editing``). Inpainting keeps the unmasked latent cells
(a cell that any repainted pixel touches is repainted, so no seam is frozen), or, for an inpainting U-Net (9 input
channels: noisy latents, mask, masked-image latents, as SD's inpainting files), hands it the mask and the masked
picture's latents through ``c_concat`` as diffusers' ``StableDiffusionInpaintPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion import Denoiser, Schedule, sample_latents
from ldm.diffusion.classifier_guidance import ClassifierGuidance
from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.control_image import ControlSettings
from ldm.inference.edit_images import MASK_THRESHOLD, EditImages
from ldm.inference.request import CheckedRequest
from ldm.nets.controlnet import ControlledDiffusion

CONCAT_KEY = "c_concat"  # LDM's name for conditioning joined to the U-Net's input channels


class Pipeline(Protocol):
    """The modules drawing needs (``ldm.inference.pipeline.Pipeline`` holds them)."""

    model: nn.Module
    cond_stage_model: nn.Module
    first_stage_model: nn.Module
    control_model: nn.Module | None
    control_scales: list[float] | None
    only_mid_control: bool
    schedule: Schedule
    parameterization: str
    scale_factor: float
    classifier: nn.Module | None
    classifier_schedule: Schedule | None
    capabilities: ModelCapabilities

    @property
    def device(self) -> torch.device: ...


def _raw(pipe: Pipeline, conditions: list) -> Tensor | list:
    return torch.as_tensor(conditions, device=pipe.device) if pipe.capabilities.is_class_model else list(conditions)


@torch.no_grad()
def conditioning(pipe: Pipeline, conditions: list, sizes: object = None) -> dict[str, Tensor]:
    """The network's conditioning keywords for prompts or labels, by name: ``{"context": (N, T, D)}`` (an SDXL
    conditioner adds the vector ``"y"`` from the request's ``sizes``)."""
    stage = pipe.cond_stage_model
    if hasattr(stage, "conditioning"):
        return dict(stage.conditioning(_raw(pipe, conditions), sizes))
    out = stage(_raw(pipe, conditions))
    return dict(out) if isinstance(out, Mapping) else {"context": out}


@torch.no_grad()
def unconditional(pipe: Pipeline, b: int, sizes: object = None) -> dict[str, Tensor]:
    """The unconditional branch's keywords for ``b`` images (SDXL: zeros for an empty prompt, as diffusers)."""
    stage = pipe.cond_stage_model
    if hasattr(stage, "unconditional_conditioning"):
        return dict(stage.unconditional_conditioning(b, sizes))
    return conditioning(pipe, stage.null_condition(b))


@torch.no_grad()
def encode_pixels(pipe: Pipeline, pixels: Tensor) -> Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] → scaled latents (N, C, h, w): the VAE posterior's mean."""
    vae = pipe.first_stage_model
    dtype = next(vae.parameters()).dtype
    return vae.encode(pixels.to(pipe.device, dtype)).mode().float() * pipe.scale_factor


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """Repaint mask (N, 1, H, W) in {0, 1} → (N, 1, H/f, W/f): a cell is repainted if any of its pixels is."""
    return F.max_pool2d(mask, kernel_size=factor, stride=factor)


def edit_arguments(pipe: Pipeline, edit: EditImages, b: int, cond: dict, uncond: dict | None) -> dict:
    """The sampling core's ``init`` / ``keep`` for a chunk of ``b`` images (and an inpainting U-Net's ``c_concat``)."""
    init = encode_pixels(pipe, edit.image)  # (1 or B, C, h, w): one shared picture is encoded once
    init = init.expand(b, -1, -1, -1) if len(init) == 1 else init  # (B, C, h, w)
    image = edit.image.expand(b, -1, -1, -1) if len(edit.image) == 1 else edit.image  # (B, 3, H, W)
    if pipe.capabilities.inpainting:
        mask = edit.mask if edit.mask is not None else torch.ones_like(image[:, :1])  # no mask: repaint all
        add_inpainting_inputs(pipe, image, mask, init.shape[-2:], cond, uncond)
        return {"init": init}
    if edit.mask is None:
        return {"init": init}
    keep = 1 - latent_mask(edit.mask, pipe.capabilities.size_step).to(init.device)  # (1 or B, 1, h, w)
    return {"init": init, "keep": keep}


def add_inpainting_inputs(pipe: Pipeline, image: Tensor, mask: Tensor, size: tuple[int, int], cond: dict,
                          uncond: dict | None) -> None:
    """An inpainting U-Net's extra channels (the mask, the masked image's latents), in both CFG branches."""
    keep_pixels = (mask < MASK_THRESHOLD).to(image)
    masked = encode_pixels(pipe, image * keep_pixels)  # (B, C, h, w): the repainted region grey
    small = F.interpolate(mask.to(masked), size=tuple(size))  # (1 or B, 1, h, w), nearest (diffusers)
    extra = torch.cat([small.expand(len(masked), -1, -1, -1), masked], dim=1)  # (B, 1 + C, h, w)
    cond[CONCAT_KEY] = extra
    if uncond is not None:
        uncond[CONCAT_KEY] = extra


def controlled_model(pipe: Pipeline, control: ControlSettings) -> nn.Module:
    """The U-Net with the ControlNet's residuals × the request's scale (× the per-residual scales it was trained with)."""
    trained = pipe.control_scales
    scales = [control.scale * s for s in trained] if trained is not None else control.scale
    return ControlledDiffusion(pipe.model.diffusion_model, pipe.control_model, scales, control.guess_mode,
                               pipe.only_mid_control)


def initial_noise(shape: tuple[int, int, int], seed: int, b: int) -> Tensor:
    """(B, C, h, w) unit noise, image j's from seed + j."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(b)])


@torch.no_grad()
def draw_latents(pipe: Pipeline, plan: CheckedRequest, conditions: list, negative: list | None,
                 control: ControlSettings | None, edit: EditImages | None, seed: int,
                 callback: Callable[[dict], None] | None, noise: Tensor | None = None) -> Tensor:
    """Latents (B, C, h, w) for one chunk; image j's noise from seed + j unless ``noise`` (B, C, h, w) is given."""
    r, device, b = plan.request, pipe.device, len(conditions)
    cond = conditioning(pipe, conditions, plan.sizes)
    uncond = {}  # scale 1 never runs the unconditional branch
    if r.guidance != 1:
        uncond = (conditioning(pipe, negative, plan.sizes) if negative is not None
                  else unconditional(pipe, b, plan.sizes))
    model = pipe.model
    if control is not None:
        model = controlled_model(pipe, control)
        cond["hint"] = control.hints.to(device)  # (1 or B, 3, H, W)
        if not control.guess_mode:  # guess mode: the unconditional branch runs without the hint
            uncond["hint"] = cond["hint"]
    if edit is None and pipe.capabilities.inpainting:  # text-to-image: everything repainted, nothing shown
        edit = EditImages(torch.zeros(1, 3, plan.height, plan.width), torch.ones(1, 1, plan.height, plan.width))
    edits = {} if edit is None else edit_arguments(pipe, edit, b, cond, uncond if r.guidance != 1 else None)
    noise = (initial_noise(plan.shape, seed, b) if noise is None else noise).to(device)
    steer = None
    if r.classifier_scale:
        labels = torch.as_tensor(conditions, device=device)  # (B,)
        steer = ClassifierGuidance(pipe.classifier, pipe.classifier_schedule, labels, r.classifier_scale)
    return sample_latents(Denoiser(model, pipe.schedule, pipe.parameterization), noise, cond, uncond,
                          sampler=r.sampler, steps=r.steps, guidance=r.guidance, guidance_rescale=r.guidance_rescale,
                          generator=torch.Generator(device).manual_seed(seed), callback=callback,
                          classifier_guidance=steer, strength=r.strength if edit is not None else 1.0, **edits,
                          **plan.options).x
