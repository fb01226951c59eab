"""The page's one door into the inference Pipeline: load a model, say what it can do, check and draw a request.

Every call into ``ldm.inference.pipeline`` from the web server is in this file, so that moving the server to
another generation API (e.g. a typed request) touches only ``ModelAdapter``. A request arrives as a
``PageRequest`` (already parsed from the form, uploads decoded); ``check`` refuses what the model cannot draw with
the Pipeline's one-line messages, before the request is queued; ``generate`` draws it, reporting each sampler step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ldm.core.images import to_pil
from ldm.diffusion import SAMPLERS
from ldm.inference.control_image import DEFAULT_CONTROL_SCALE
from ldm.inference.loaders import PipelineError, describe_run, resolve_class
from ldm.inference.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.75  # image-to-image: how far the init image is noised (1 = text-to-image)
DEFAULT_BATCH_SIZE = 1  # images drawn at once: 1 lets every image reproduce alone from its own seed
NO_INIT_SUPPORT = ("an init image / mask (image-to-image, inpainting) is not supported by this version of the "
                   "pipeline: leave the init image and mask empty")

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


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
    init_image: bool = False  # image-to-image and inpainting


@dataclass(frozen=True)
class PageRequest:
    """One visitor's request, parsed from the form: ``n`` images, image i from ``seed + i``."""

    sampler: str
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    n: int = 1
    prompt: str | None = None  # text models
    negative: str | None = None
    label: str | None = None  # class models: a class name or index, as the CLI's --class
    control: Image.Image | None = None  # ControlNet models
    control_name: str | None = None  # how the PNG parameters name the control image (never the browser's name)
    control_scale: float = DEFAULT_CONTROL_SCALE
    init: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
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
        self.class_names = describe_run(source.run).class_names if source.run else None
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
        pipe = self.pipe
        names = []
        if pipe.condition_key == "label":
            names = list(self.class_names or [str(k) for k in range(pipe.n_classes or 0)])
        return ModelInfo(pipe.condition_key, names, pipe.control_model is not None, int(pipe.image_size),
                         int(pipe.downsampling_factor), list(SAMPLERS), dict(pipe.source))

    def check(self, request: PageRequest) -> None:
        """Refuse what the model cannot draw (PipelineError, the CLI's one-line messages) before queueing."""
        pipe = self.pipe
        if request.init is not None or request.mask is not None:
            if not self.info.init_image:
                raise PipelineError(NO_INIT_SUPPORT)
        if request.sampler not in SAMPLERS:
            raise PipelineError(f"unknown sampler {request.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        pipe.check_conditions([self._condition(request)])
        if request.negative:
            pipe.check_conditions([request.negative], "negative condition")
        pipe.latent_shape(request.height, request.width)
        if self.info.controlnet and request.control is None:
            raise PipelineError("this model is a ControlNet: give a control image, e.g. an edge map from "
                                "scripts/make_edges.py")
        if not self.info.controlnet and request.control is not None:
            raise PipelineError("this model has no ControlNet, so it takes no control image: leave it empty")

    def _condition(self, request: PageRequest) -> str | int:
        """The prompt (text model) or class label (class model) of a request."""
        if self.info.condition_key == "label":
            if request.label is None or request.label == "":
                raise PipelineError("this model is class-conditional: choose a class")
            return resolve_class(request.label, self.class_names, self.pipe.n_classes, where="class")
        if request.label is not None:
            raise PipelineError("this model is text-conditional: give a prompt, not a class")
        return request.prompt or ""

    def generate(self, request: PageRequest, on_step: StepCallback | None = None) -> list[Drawn]:
        """Draw ``request.n`` images (image i from seed + i), calling ``on_step(done, total)`` after each step."""
        self.check(request)
        lora = (request.lora, request.lora_scale) if request.lora is not None else None
        if lora != self._lora:
            log.info("loading the model with LoRA %s", "none" if lora is None else f"{lora[0].name}:{lora[1]}")
            self.pipe = self._load(lora)
        condition = self._condition(request)
        chunks = -(-request.n // self.batch_size)
        total, done = chunks * request.steps, 0

        def step(_info: dict) -> None:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, total)

        options = {}  # init / mask / strength join here once the pipeline draws from images (ModelInfo.init_image)
        if request.control is not None:
            options.update(control=request.control, control_scale=request.control_scale)
        tensors = self.pipe.generate_tensors(
            [condition] * request.n, steps=request.steps, guidance=request.guidance, sampler=request.sampler,
            seed=request.seed, negative=request.negative or None, height=request.height, width=request.width,
            batch_size=self.batch_size, callback=step, **options)  # (N, 3, H, W) in [-1, 1]
        seeds = [request.seed + i for i in range(request.n)]
        return [Drawn(image, seed, self.parameters(request, condition, seed))
                for image, seed in zip(to_pil(tensors), seeds)]

    def parameters(self, request: PageRequest, condition: str | int, seed: int) -> dict:
        """The PNG parameters of one image, with txt2img.py's keys (``ldm.inference.png_params``)."""
        source = self.pipe.source
        kind = "class" if self.info.condition_key == "label" else "prompt"
        params = {kind: condition, "negative_prompt": request.negative or None, "seed": seed,
                  "steps": request.steps, "sampler": request.sampler, "scale": request.guidance,
                  "guidance_rescale": 0.0, "height": request.height, "width": request.width,
                  "run": source.get("run"), "checkpoint": source.get("checkpoint"), "ema": source.get("ema"),
                  "dtype": str(self.pipe.dtype).removeprefix("torch.")}
        if kind == "class" and self.class_names:
            params["class_name"] = self.class_names[condition]
        if source.get("config") or source.get("controlnet"):
            params.update(config=source.get("config"), controlnet=source.get("controlnet"))
        if request.control is not None:
            params.update(control=request.control_name, control_scale=request.control_scale, guess_mode=False)
        if source.get("lora"):
            params["lora"] = source["lora"]
        return params

