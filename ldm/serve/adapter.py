"""The page's one door into the inference Pipeline: load a model, say what it can do, check and draw a request.

Every call into ``ldm.inference`` from the web server is in this file. A request arrives as a ``PageRequest``
(already parsed from the form, uploads decoded); ``request`` turns it into the ``GenerationRequest`` every front end
shares; ``check`` refuses what the model cannot draw with ``check_request``'s one-line messages (the Python API's
names), before the request is queued; ``generate`` draws it with ``Pipeline.generate``, reporting each sampler step,
and each image keeps the Generation's own PNG parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ldm.diffusion import SAMPLERS
from ldm.inference.control_image import DEFAULT_CONTROL_SCALE
from ldm.inference.loaders import PipelineError, resolve_class
from ldm.inference.pipeline import Pipeline
from ldm.inference.request import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    CheckedRequest,
    GenerationRequest,
    check_request,
)
from ldm.inference.request_names import PYTHON_NAMES

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.75  # an init image alone: how far it is noised (1 with a mask, as txt2img.py)
MASK_STRENGTH = 1.0  # inpainting repaints the white cells from noise
DEFAULT_BATCH_SIZE = 1  # images drawn at once: 1 lets every image reproduce alone from its own seed
INPUT_KEYS = {"control": "control", "init": "init_image", "mask": "mask"}  # PageRequest field → PNG parameter key

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
ImageInput = Image.Image | Path  # an upload in memory, or the file it was kept in


def default_strength(init: object, mask: object) -> float:
    """The strength when none is given: 0.75 from an init image alone, 1 with a mask (txt2img.py's defaults)."""
    return DEFAULT_STRENGTH if init is not None and mask is None else MASK_STRENGTH


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a run (``run``), or a public file (``ckpt`` + ``config``, ``controlnet``)."""

    run: str | None = None
    ckpt: str | None = None
    config: str | None = None
    controlnet: str | None = None
    device: str | None = None
    dtype: str | None = None
    use_ema: bool = True
    unsafe: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model draws, as the page needs it (no caller probes the Pipeline)."""

    condition_key: str  # "caption" (text) or "label" (class)
    class_names: list[str]  # a class model's names ("0", "1", … when the run keeps none); empty for text
    controlnet: bool  # every request then needs a control image
    image_size: int  # the default height and width
    size_multiple: int  # heights and widths are multiples of this (the VAE's factor)
    samplers: list[str]
    source: dict  # run / checkpoint / config / controlnet / ema, for the page and the PNG parameters
    defaults: dict = field(default_factory=lambda: {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                                                    "sampler": DEFAULT_SAMPLER, "strength": DEFAULT_STRENGTH,
                                                    "control_scale": DEFAULT_CONTROL_SCALE})
    init_image: bool = True  # image-to-image and inpainting (a mask) with every model
    inpainting: bool = False  # an inpainting U-Net (mask and masked picture as inputs), else masked latent blending


@dataclass(frozen=True)
class PageRequest:
    """One visitor's request, parsed from the form: ``n`` images, image i from ``seed + i``."""

    sampler: str
    steps: int
    guidance: float
    seed: int
    height: int | None  # None: the model's size, or the init image's cut to the model's grid
    width: int | None
    n: int = 1
    prompt: str | None = None  # text models
    negative: str | None = None
    label: str | None = None  # class models: a class name or index, as the CLI's --class
    control: ImageInput | None = None  # ControlNet models
    control_scale: float = DEFAULT_CONTROL_SCALE
    init: ImageInput | None = None  # image-to-image / inpainting: the picture to start from
    mask: ImageInput | None = None  # inpainting: white = repaint (the init image's size)
    strength: float | None = None  # None: ``default_strength``
    names: dict[str, str] = field(default_factory=dict)  # field → the upload's content name (never the browser's)
    lora: Path | None = None  # a file from the server's LoRA folder
    lora_scale: float = 1.0


@dataclass(frozen=True)
class Drawn:
    """One generated image and everything needed to draw it again (``txt2img.py``'s PNG parameters)."""

    image: Image.Image
    seed: int
    params: dict


class ModelAdapter:
    """Loads the Pipeline once (again only when the LoRA choice changes) and draws PageRequests with it."""

    def __init__(self, source: ModelSource, batch_size: int = DEFAULT_BATCH_SIZE):
        self.source = source
        self.batch_size = batch_size
        self._lora: tuple[Path, float] | None = None
        self.pipe = self._load(None)
        self.info = self._describe()

    def _load(self, lora: tuple[Path, float] | None) -> Pipeline:
        s = self.source
        if s.run is not None:
            pipe = Pipeline.from_run(s.run, device=s.device, dtype=s.dtype, use_ema=s.use_ema)
        else:
            pipe = Pipeline.from_checkpoint(s.ckpt, s.config, controlnet=s.controlnet, unsafe=s.unsafe,
                                            device=s.device, dtype=s.dtype, use_ema=s.use_ema)
        if lora is not None:
            pipe.with_lora(lora[0], lora[1], unsafe=s.unsafe)  # folded into the weights, as txt2img's default
        self._lora = lora
        return pipe

    def _describe(self) -> ModelInfo:
        caps = self.pipe.capabilities
        names = list(caps.class_names or [str(k) for k in range(caps.n_classes or 0)]) if caps.is_class_model else []
        return ModelInfo(caps.condition_key, names, bool(caps.control), int(caps.image_size or 0),
                         int(caps.size_multiple or 1), list(SAMPLERS), dict(self.pipe.source),
                         inpainting=caps.inpainting)

    def request(self, page: PageRequest) -> GenerationRequest:
        """The GenerationRequest of a page's request (image i from seed + i), with the page's LoRA choice."""
        strength = default_strength(page.init, page.mask) if page.strength is None else page.strength
        loras = ((str(page.lora), float(page.lora_scale)),) if page.lora is not None else ()
        return GenerationRequest(
            [self._condition(page)] * page.n, negative=page.negative or None, height=page.height, width=page.width,
            steps=page.steps, sampler=page.sampler, guidance=page.guidance, seed=page.seed,
            batch_size=self.batch_size, control=page.control, control_scale=page.control_scale, loras=loras,
            init_image=page.init, strength=strength, mask=page.mask)

    def check(self, page: PageRequest) -> CheckedRequest:
        """Refuse what the model cannot draw (PipelineError, the Python API's one-line messages) before queueing."""
        return check_request(self.request(page), self.pipe.capabilities, PYTHON_NAMES)

    def _condition(self, page: PageRequest) -> str | int:
        """The prompt (text model) or class label (class model) of a request."""
        caps = self.pipe.capabilities
        if caps.is_class_model:
            if page.label is None or page.label == "":
                raise PipelineError("this model is class-conditional: choose a class")
            return resolve_class(page.label, self._class_names(), caps.n_classes, where="class")
        if page.label is not None:
            raise PipelineError("this model is text-conditional: give a prompt, not a class")
        return page.prompt or ""

    def _class_names(self) -> list[str] | None:
        """The class names the run keeps (None: indices only)."""
        return list(self.pipe.capabilities.class_names or []) or None

    def generate(self, page: PageRequest, on_step: StepCallback | None = None) -> list[Drawn]:
        """Draw ``page.n`` images (image i from seed + i), calling ``on_step(done, total)`` after each step."""
        self.check(page)
        lora = (page.lora, page.lora_scale) if page.lora is not None else None
        if lora != self._lora:
            log.info("loading the model with LoRA %s", "none" if lora is None else f"{lora[0].name}:{lora[1]}")
            self.pipe = self._load(lora)
        request = self.request(page)
        total, done = math.ceil(page.n / self.batch_size) * self.pipe.check(request).steps_run, 0

        def step(_info: dict) -> None:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, total)

        generation = self.pipe.generate(request, callback=step)
        return [Drawn(image, seed, recorded_inputs(params, page))
                for image, seed, params in zip(generation.images, generation.seeds, generation.parameters)]


def recorded_inputs(params: dict, page: PageRequest) -> dict:
    """The PNG parameters with each upload drawn from memory named by its content name (a kept file names itself)."""
    params = dict(params)
    for name, key in INPUT_KEYS.items():
        if isinstance(getattr(page, name), Image.Image) and name in page.names:
            params[key] = page.names[name]
    return params
