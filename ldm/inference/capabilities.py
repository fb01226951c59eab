"""What a sampling model can do, declared once: the one place that reads a loaded system's (or a run's config's)
optional parts, so that requests are checked against a typed object instead of probing attributes.

``ModelCapabilities.of_system`` describes a built system (a run, a public file, a live system, after loading);
``of_run`` and ``of_sd`` describe what a run or a public file will be from its config alone (a command line
checks a request against them before loading anything: a ControlNet file may hold a ControlNet that only loading
tells, ``control=None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import nn

from ldm.core.config import ConfigError, get_obj_from_str
from ldm.inference.loaders import RunSummary

TEXT_KEY = "caption"
LABEL_KEY = "label"
INPAINT_EXTRA_CHANNELS = 1  # an inpainting U-Net also takes the mask (1 channel) and the masked image's latents


def downsampling_of(channel_mult: Sequence | None) -> int:
    """2^(levels − 1): how much a U-Net of these channel multipliers halves its input (1 level when unknown)."""
    return 2 ** (len(channel_mult or [1]) - 1)


def unet_downsampling(model: Mapping | None) -> int:
    """The U-Net's downsampling from a model config node (``params.unet.params.channel_mult``)."""
    unet = (((model or {}).get("params") or {}).get("unet") or {}).get("params") or {}
    return downsampling_of(unet.get("channel_mult"))


def takes_sizes(model: Mapping | None) -> bool | None:
    """Whether a model node's conditioner takes SDXL's sizes (its class says; None when it cannot be imported)."""
    target = (((model or {}).get("params") or {}).get("cond_stage") or {}).get("target")
    try:
        return bool(getattr(get_obj_from_str(target), "takes_sizes", False)) if target else False
    except ConfigError:
        return None


@dataclass(frozen=True)
class ModelCapabilities:
    """A sampling model's declared abilities: its conditioning, control, sizes and inputs."""

    condition_key: str  # "caption" (prompts) or "label" (class labels)
    n_classes: int | None = None  # a class model's label count
    class_names: tuple[str, ...] | None = None  # label i is class_names[i]
    control: bool | None = False  # a ControlNet (every request needs a control image); None: unknown before loading
    size_step: int | None = None  # pixels per latent cell (the VAE's factor)
    unet_downsampling: int = 1  # how much the U-Net divides the latent further (2^(levels − 1))
    image_size: int | None = None  # the default height and width in pixels (None: unknown, give them)
    latent_channels: int | None = None  # C of the latents the U-Net denoises
    inpainting: bool = False  # a U-Net that takes [noisy latents, mask, masked-image latents] (SD inpainting files)
    classifier: bool = False  # a noise-aware classifier is attached (classifier guidance)
    takes_sizes: bool | None = False  # SDXL's micro-conditioning (original size, crop, target size); None: unknown

    @property
    def size_multiple(self) -> int | None:
        """What height and width must be multiples of: the VAE's factor × the U-Net's downsampling."""
        return self.size_step * self.unet_downsampling if self.size_step else None

    @property
    def is_class_model(self) -> bool:
        """Whether conditions are class labels."""
        return self.condition_key == LABEL_KEY

    @classmethod
    def of_system(cls, system: nn.Module, classifier: bool = False) -> ModelCapabilities:
        """The abilities of a built LatentDiffusion or ControlLDM system (the one place its optional parts are read)."""
        cond = system.cond_stage_model
        unet = system.model.diffusion_model
        names = getattr(cond, "class_names", None)
        latent = int(unet.out_channels)
        return cls(condition_key=cond.key, n_classes=getattr(cond, "n_classes", None),
                   class_names=tuple(names) if names else None,
                   control=getattr(system, "control_model", None) is not None,
                   size_step=int(system.first_stage_model.downsampling_factor),
                   unet_downsampling=downsampling_of((getattr(unet, "config", None) or {}).get("channel_mult")),
                   image_size=int(system.image_size) if system.image_size else None, latent_channels=latent,
                   inpainting=int(unet.in_channels) == 2 * latent + INPAINT_EXTRA_CHANNELS, classifier=classifier,
                   takes_sizes=bool(getattr(cond, "takes_sizes", False)))

    @classmethod
    def of_run(cls, run: RunSummary) -> ModelCapabilities:
        """What a stage-2 or ControlNet run draws, from its config alone (before loading)."""
        return cls(condition_key=run.condition_key, n_classes=run.n_classes,
                   class_names=tuple(run.class_names) if run.class_names else None, control=run.controlnet,
                   size_step=run.downsampling_factor, unet_downsampling=unet_downsampling(run.config.get("model")))

    @classmethod
    def of_config(cls, condition_key: str, size_step: int | None, control: bool | None,
                  model: Mapping | None = None) -> ModelCapabilities:
        """What a public file's inference config (its ``model`` node) tells before loading (its ControlNet may only
        show on loading)."""
        return cls(condition_key=condition_key, size_step=size_step, control=control,
                   unet_downsampling=unet_downsampling(model), takes_sizes=takes_sizes(model))

    def with_classifier(self) -> ModelCapabilities:
        """The same model with a classifier attached."""
        return replace(self, classifier=True)
