"""One generation request, checked once against what the model can do (``ldm.inference.capabilities``).

A ``GenerationRequest`` is what every front end (the command line, Python, a web page) asks for: conditions
(prompts or class labels, one per image), negatives, size, steps, sampler and its options, guidance and its
rescale, the first seed (image i starts from seed + i), batch size, a control image and its scale, LoRA files,
a classifier-guidance scale, and for editing an init image with its strength and a mask (white = repaint).

``check_request(request, capabilities, names)`` is the one place a request is refused, with one-line errors that
call each setting by the front end's name (``ldm.inference.request_names``: ``PYTHON_NAMES`` "steps", "guidance
scale"; ``CLI_NAMES`` "--steps", "--scale"). ``before_loading=True`` checks what a run's config already tells (a
command line does this first); the Pipeline checks the same request again against the loaded model and gets a ``CheckedRequest`` to sample.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ldm.diffusion import SAMPLERS
from ldm.diffusion.editing import first_step
from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.control_image import (
    DEFAULT_CONTROL_SCALE,
    ControlImageError,
    ControlInput,
    ControlSettings,
    prepare_hints,
)
from ldm.inference.edit_images import EditImageError, EditImages, ImageInput, image_size, prepare_edit
from ldm.inference.loaders import PipelineError
from ldm.inference.request_names import PYTHON_NAMES, Names
from ldm.nets.conditioning.sdxl import SIZE_FIELDS, SizeConditioning

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_BATCH_SIZE = 8  # images sampled at once (CFG doubles the U-Net's batch)
RUNTIME_OPTIONS = ("generator", "callback", "progress")  # sampler arguments a request cannot set


@dataclass(frozen=True)
class GenerationRequest:
    """What to draw and how; image i is ``conditions[i]`` from seed ``seed + i`` (module docstring)."""

    conditions: Sequence | str | int  # prompts (text models) or class labels (class models), one per image
    negative: Sequence | str | int | None = None  # one for all images or one per image; None: the empty condition
    height: int | None = None  # pixels (None: the model's image size)
    width: int | None = None
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    sampler_options: dict = field(default_factory=dict)  # the sampler's own keywords (eta, s_noise, …)
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale (1 = none)
    guidance_rescale: float = 0.0  # CFG rescale φ in [0, 1] (Lin et al. 2023)
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    control: ControlInput | Sequence[ControlInput] | None = None  # a ControlNet's hint (path, PIL, (3, H, W) tensor)
    control_scale: float = DEFAULT_CONTROL_SCALE
    guess_mode: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) the model must carry (``Pipeline.with_lora``)
    classifier_scale: float = 0.0  # classifier guidance (needs ``Pipeline.with_classifier``)
    init_image: ImageInput | None = None  # image-to-image / inpainting: the picture to start from
    strength: float = 1.0  # how much of the ladder to run from the init image: 1 = from noise, 0 = the image itself
    mask: ImageInput | None = None  # inpainting: white (1) = repaint, black (0) = keep; the init image's size
    sizes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # SDXL: original_size, crop_top_left, target_size

    @classmethod
    def of(cls, conditions: Sequence | str | int, seed: int = 0, **options) -> GenerationRequest:
        """A request from keyword arguments; SDXL's size fields go to ``sizes``, keywords that are not fields are the
        sampler's own (``eta``, …)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("sampler_options", "sizes")}
        own = {k: v for k, v in options.items() if k in names}
        sizes = {k: v for k, v in options.items() if k in SIZE_FIELDS and v is not None}
        rest = {k: v for k, v in options.items() if k not in names and k not in SIZE_FIELDS}
        return cls(conditions, seed=seed, sampler_options=rest, sizes=sizes, **own)

    @property
    def seeds(self) -> list[int]:
        """Each image's seed."""
        return [self.seed + i for i in range(len(as_conditions(self.conditions)))]


@dataclass(frozen=True)
class CheckedRequest:
    """A request checked against a model: one condition per image, the latent shape, prepared images."""

    request: GenerationRequest
    conditions: list
    negative: list | None
    shape: tuple[int, int, int]  # (C, h, w) of the latents
    height: int
    width: int
    options: dict  # the sampler's own keywords
    control: ControlSettings | None
    edit: EditImages | None  # init image (and mask) in pixels
    sizes: SizeConditioning | None = None  # SDXL's micro-conditioning: original size, crop, target size

    @property
    def steps_run(self) -> int:
        """Sampler steps each chunk runs (fewer than ``steps`` from an init image below strength 1): progress totals."""
        r = self.request
        return r.steps - first_step(r.steps, r.strength) if r.init_image is not None else r.steps

    def settings(self) -> dict:
        """The settings a Generation records (control scale and guess mode for a ControlNet, the classifier scale)."""
        r = self.request
        extra = {} if self.control is None else {"control_scale": self.control.scale,
                                                 "guess_mode": self.control.guess_mode}
        if r.classifier_scale:
            extra["classifier_scale"] = r.classifier_scale
        if self.edit is not None:
            extra["strength"] = r.strength
        if self.sizes is not None:
            extra.update({k: list(v) for k, v in vars(self.sizes).items()})
        return dict(steps=r.steps, guidance=r.guidance, sampler=r.sampler, guidance_rescale=r.guidance_rescale,
                    height=self.height, width=self.width, **extra, **self.options)


# ---------------------------------------------------------------------------------------------- conditions


def as_conditions(conditions: Sequence | str | int) -> list:
    """One prompt or label as a list of one; a tensor as a list."""
    if isinstance(conditions, torch.Tensor):
        conditions = conditions.reshape(-1).tolist()
    return [conditions] if isinstance(conditions, (str, numbers.Integral)) else list(conditions)


def check_conditions(conditions: Sequence | str | int, caps: ModelCapabilities, what: str = "condition") -> list:
    """Prompts for a text model, integer labels in range for a class model; PipelineError otherwise."""
    conditions = as_conditions(conditions)
    if not conditions:
        raise PipelineError(f"no {what}s given")
    if caps.is_class_model:
        bad = [c for c in conditions if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise PipelineError(f"this run is class-conditional: give integer class labels, not {bad[0]!r}")
        conditions = [int(c) for c in conditions]
        n = caps.n_classes
        out = [c for c in conditions if n is not None and not 0 <= c < n]
        if out:
            raise PipelineError(f"class {out[0]} is out of range: this run has classes 0..{n - 1}")
    elif any(not isinstance(c, str) for c in conditions):
        bad = next(c for c in conditions if not isinstance(c, str))
        raise PipelineError(f"this run is text-conditional: give prompts (str), not {bad!r}")
    return conditions


def check_negatives(negative: Sequence | str | int | None, n: int, caps: ModelCapabilities) -> list | None:
    """One negative condition per image (one given for all is repeated), checked as conditions are."""
    if negative is None:
        return None
    negative = [negative] * n if isinstance(negative, (str, numbers.Integral)) else list(negative)
    if len(negative) != n:
        raise PipelineError(f"{len(negative)} negative conditions for {n} images")
    return check_conditions(negative, caps, "negative condition")


# ---------------------------------------------------------------------------------------------- settings


def check_sampling(r: GenerationRequest, names: Names) -> None:
    """Sampler, its options, steps, guidance, rescale, batch size and seed."""
    if r.sampler not in SAMPLERS:
        raise PipelineError(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for name, value in ((names.steps, r.steps), (names.batch_size, r.batch_size)):
        if value < 1:
            raise PipelineError(f"{name} must be at least 1, got {value}")
    if not r.guidance >= 0:
        raise PipelineError(f"{names.guidance} must be ≥ 0, got {r.guidance}")
    if not 0 <= r.guidance_rescale <= 1:
        raise PipelineError(f"{names.guidance_rescale} must be in [0, 1], got {r.guidance_rescale}")
    if r.seed < 0:
        raise PipelineError(f"{names.seed} must be ≥ 0, got {r.seed}")
    accepted = inspect.signature(SAMPLERS[r.sampler]).parameters
    for option, value in r.sampler_options.items():
        if option not in accepted or option in RUNTIME_OPTIONS:
            takers = [s for s, fn in SAMPLERS.items() if option in inspect.signature(fn).parameters]
            where = f" ({names.option(option)} applies to the samplers {', '.join(takers)})" if takers else ""
            raise PipelineError(f"sampler {r.sampler!r} takes no option {option!r}{where}")
        if isinstance(value, numbers.Real) and not value >= 0:
            raise PipelineError(f"{names.option(option)} must be ≥ 0, got {value}")


def check_size(r: GenerationRequest, caps: ModelCapabilities, names: Names, before_loading: bool) -> tuple[int, int]:
    """The output size (the model's when not given), positive multiples of the VAE's factor; (0, 0) when unknown."""
    for name, value in ((names.height, r.height), (names.width, r.width)):
        if value is not None and value < 1:
            raise PipelineError(f"{name} must be a positive number of pixels, got {value}")
    default_height = default_width = caps.image_size
    multiple = caps.size_multiple
    if r.init_image is not None:  # image-to-image draws at the init image's size, cut to the model's grid
        step = multiple or 1
        default_height, default_width = (max(step, v - v % step) for v in image_size(r.init_image, names.init_image))
    height, width = r.height or default_height, r.width or default_width
    if not height or not width:
        if before_loading:
            height, width = height or 0, width or 0
        else:
            raise PipelineError("the run does not record its image size: give the height and width in pixels")
    for name, value in ((names.height, height), (names.width, width)):
        if multiple and value and value % multiple:
            raise PipelineError(off_grid(names, name, value, height, width, caps))
    return height, width


def off_grid(names: Names, name: str, value: int, height: int, width: int, caps: ModelCapabilities) -> str:
    """The one-line refusal of a side that is not a multiple of the model's grid, with the nearest sizes."""
    multiple, factor = caps.size_multiple, caps.size_step

    def nearest(side: int) -> int:
        return max(multiple, (side + multiple // 2) // multiple * multiple)

    lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
    return names.off_grid.format(flag=name, value=value, height=height, width=width, multiple=multiple, factor=factor,
                                 down=caps.unet_downsampling, halvings=caps.unet_downsampling.bit_length() - 1,
                                 near=f"{lower} or {upper}" if lower else f"{upper}",
                                 near_width=nearest(width), near_height=nearest(height))


def check_readable(value, name: str, error: type[Exception] = PipelineError) -> None:
    """An image given by path must open as an image."""
    if not isinstance(value, (str, os.PathLike)):
        return
    try:
        with Image.open(value) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise error(f"cannot read {name} {value}: {getattr(e, 'strerror', None) or e}") from e


def check_control(r: GenerationRequest, caps: ModelCapabilities, names: Names, model: str = "this model") -> None:
    """A control image exactly for a ControlNet model, a scale ≥ 0, a readable file."""
    if r.control is None:
        if caps.control:
            raise PipelineError(f"{model} {names.give_control}")
        return
    if caps.control is False:
        raise PipelineError(f"{names.control} needs a ControlNet model, and this model has no ControlNet: "
                            f"{names.controlnet_hint}")
    if not r.control_scale >= 0:
        raise PipelineError(f"{names.control_scale} must be ≥ 0, got {r.control_scale}")
    for item in r.control if isinstance(r.control, (list, tuple)) else [r.control]:
        check_readable(item, names.control, ControlImageError)


def check_edit(r: GenerationRequest, names: Names) -> None:
    """Strength in [0, 1]; a mask needs an init image; both readable."""
    if not 0 <= r.strength <= 1:
        raise PipelineError(f"{names.strength} must be in [0, 1], got {r.strength}")
    if r.init_image is None:
        for name, given in ((names.mask, r.mask is not None), (names.strength, r.strength != 1)):
            if given:
                raise PipelineError(f"{name} needs {names.init_image} (the picture to edit)")
        return
    check_readable(r.init_image, names.init_image)
    check_readable(r.mask, names.mask)
    if r.mask is not None and image_size(r.mask, names.mask) != image_size(r.init_image, names.init_image):
        (mh, mw), (ih, iw) = image_size(r.mask, names.mask), image_size(r.init_image, names.init_image)
        raise EditImageError(f"{names.mask} is {mw}×{mh} pixels but {names.init_image} is {iw}×{ih}: give a mask of "
                             "the init image's size (white = repaint, black = keep)")


def check_extras(r: GenerationRequest, caps: ModelCapabilities, names: Names) -> None:
    """Classifier guidance and LoRA files."""
    if r.classifier_scale:
        if not caps.classifier:
            raise PipelineError("classifier_scale needs a classifier: Pipeline.with_classifier(run), or --classifier")
        if not caps.is_class_model:
            raise PipelineError("classifier guidance steers toward class labels: this run is text-conditional")
    if not r.classifier_scale >= 0:
        raise PipelineError(f"{names.classifier_scale} must be ≥ 0, got {r.classifier_scale}")
    for path, scale in r.loras:
        if not Path(path).is_file():
            raise PipelineError(f"LoRA file {path} not found (give FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
        if not math.isfinite(scale):
            raise PipelineError(f"LoRA scale of {path} must be a finite number, got {scale}")


def check_sizes(r: GenerationRequest, caps: ModelCapabilities, names: Names, height: int, width: int
                ) -> SizeConditioning | None:
    """SDXL's micro-conditioning of the request: the sizes given, the rest defaulted (original = target = the image
    size, crop 0, 0); refused by name for a model that takes none (None before loading tells)."""
    unknown = [k for k in r.sizes if k not in SIZE_FIELDS]
    if unknown:
        raise PipelineError(f"unknown size conditioning {', '.join(unknown)}; the fields are {', '.join(SIZE_FIELDS)}")
    if caps.takes_sizes is False and r.sizes:
        raise PipelineError(f"this model takes no size conditioning ({', '.join(names.option(k) for k in r.sizes)}): "
                            "only SDXL models do")
    if not caps.takes_sizes or not height:
        return None
    try:
        return SizeConditioning.for_size(height, width, **r.sizes)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"size conditioning: {e}") from e


def check_request(request: GenerationRequest, caps: ModelCapabilities, names: Names = PYTHON_NAMES,
                  before_loading: bool = False, model: str = "this model") -> CheckedRequest:
    """Refuse what the model (called ``model`` in messages) cannot draw (one-line PipelineError); prepare the
    control and edit images (not ``before_loading``, when only the model's config has been read)."""
    conditions = check_conditions(request.conditions, caps)
    negative = check_negatives(request.negative, len(conditions), caps)
    check_extras(request, caps, names)
    check_sampling(request, names)
    check_edit(request, names)
    height, width = check_size(request, caps, names, before_loading)
    check_control(request, caps, names, model)
    sizes = check_sizes(request, caps, names, height, width)
    shape = (caps.latent_channels or 0, height // (caps.size_step or 1), width // (caps.size_step or 1))
    if before_loading or not height:
        return CheckedRequest(request, conditions, negative, shape, height, width, dict(request.sampler_options),
                              None, None, sizes)
    control = None if request.control is None else ControlSettings(
        prepare_hints(request.control, len(conditions), height, width), float(request.control_scale),
        bool(request.guess_mode))
    edit = None if request.init_image is None else prepare_edit(request.init_image, request.mask, len(conditions),
                                                                height, width, names.init_image, names.mask)
    return CheckedRequest(request, conditions, negative, shape, height, width, dict(request.sampler_options),
                          control, edit, sizes)
