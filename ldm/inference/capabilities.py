"""What a sampling model can do, declared once: the one place that reads a loaded system's (or a run's config's)
optional parts, so that requests are checked against a typed object instead of probing attributes.

``ModelCapabilities.of_system`` describes a built system (a run, a public file, a live system, after loading);
``of_run`` and ``of_sd`` describe what a run or a public file will be from its config alone (a command line
checks a request against them before loading anything: a ControlNet file may hold a ControlNet that only loading
tells, ``control=None``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ldm.inference.loaders import RunSummary

TEXT_KEY = "caption"
LABEL_KEY = "label"
INPAINT_EXTRA_CHANNELS = 1  # an inpainting U-Net also takes the mask (1 channel) and the masked image's latents


@dataclass(frozen=True)
class ModelCapabilities:
    """A sampling model's declared abilities: its conditioning, control, sizes and inputs."""

    condition_key: str  # "caption" (prompts) or "label" (class labels)
    n_classes: int | None = None  # a class model's label count
    class_names: tuple[str, ...] | None = None  # label i is class_names[i]
    control: bool | None = False  # a ControlNet (every request needs a control image); None: unknown before loading
    size_step: int | None = None  # pixels per latent cell: height and width must be multiples of it
    image_size: int | None = None  # the default height and width in pixels (None: unknown, give them)
    latent_channels: int | None = None  # C of the latents the U-Net denoises
    inpainting: bool = False  # a U-Net that takes [noisy latents, mask, masked-image latents] (SD inpainting files)
    classifier: bool = False  # a noise-aware classifier is attached (classifier guidance)

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
                   image_size=int(system.image_size) if system.image_size else None, latent_channels=latent,
                   inpainting=int(unet.in_channels) == 2 * latent + INPAINT_EXTRA_CHANNELS, classifier=classifier)

    @classmethod
    def of_run(cls, run: RunSummary) -> ModelCapabilities:
        """What a stage-2 or ControlNet run draws, from its config alone (before loading)."""
        return cls(condition_key=run.condition_key, n_classes=run.n_classes,
                   class_names=tuple(run.class_names) if run.class_names else None, control=run.controlnet,
                   size_step=run.downsampling_factor)

    @classmethod
    def of_config(cls, condition_key: str, size_step: int | None, control: bool | None) -> ModelCapabilities:
        """What a public file's inference config tells before loading (its ControlNet may only show on loading)."""
        return cls(condition_key=condition_key, size_step=size_step, control=control)

    def with_classifier(self) -> ModelCapabilities:
        """The same model with a classifier attached."""
        return replace(self, classifier=True)
