"""How a front end calls a ``GenerationRequest``'s settings in its one-line errors: Python's keywords
(``PYTHON_NAMES``: "steps", "guidance scale") or the command line's flags (``CLI_NAMES``: "--steps", "--scale")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """How a front end calls the request's settings in its messages."""

    steps: str = "steps"
    guidance: str = "guidance scale"
    guidance_rescale: str = "guidance rescale"
    batch_size: str = "batch size"
    seed: str = "seed"
    height: str = "height"
    width: str = "width"
    control: str = "the control image"
    control_scale: str = "control scale"
    classifier_scale: str = "classifier scale"
    init_image: str = "the init image"
    strength: str = "strength"
    mask: str = "the mask"
    controlnet_hint: str = "load a ControlNet run (runs/controlnet/…) or pass a ControlNet file (controlnet=, --controlnet)"
    give_control: str = "is a ControlNet: give a control image (control=…, --control), e.g. an edge map from " \
                        "scripts/make_edges.py"
    off_grid: str = ("image size {width}×{height} (width×height) is not a positive multiple of {multiple} (the VAE's "
                     "factor {factor} × the U-Net's downsampling {down}); e.g. {near_width}×{near_height}")

    def option(self, name: str) -> str:
        """A sampler option's name."""
        return name


@dataclass(frozen=True)
class CliNames(Names):
    """The command line's flags."""

    steps: str = "--steps"
    guidance: str = "--scale"
    guidance_rescale: str = "--guidance-rescale"
    batch_size: str = "--batch-size"
    seed: str = "--seed"
    height: str = "--H"
    width: str = "--W"
    control: str = "--control"
    control_scale: str = "--control-scale"
    classifier_scale: str = "--classifier-scale"
    init_image: str = "--init"
    strength: str = "--strength"
    mask: str = "--mask"
    controlnet_hint: str = "use a run under runs/controlnet/, or --ckpt with --controlnet FILE"
    give_control: str = "is a ControlNet model: give --control IMAGE (e.g. an edge map)"
    off_grid: str = ("{flag} {value} is not a multiple of {multiple}: the VAE divides by {factor} and the U-Net halves "
                     "the latent {halvings} time(s) more; use a multiple of {multiple}, e.g. {near}")

    def option(self, name: str) -> str:
        """A sampler option's flag."""
        return "--" + name.replace("_", "-")


PYTHON_NAMES = Names()
CLI_NAMES = CliNames()
