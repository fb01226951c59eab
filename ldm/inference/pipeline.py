"""Generation as a request to a model: ``GenerationRequest`` → check → sampling core → VAE decode → images.

``Pipeline.from_run("runs/ldm/latest")`` loads a stage-2 or ControlNet run (EMA weights by default);
``Pipeline.from_checkpoint(ckpt, config, controlnet=…)`` a public Stable Diffusion (+ ControlNet) file, an
inpainting one included; ``Pipeline.from_system(system)`` shares a live system's modules (its sample grids). Each
declares what it can do in ``capabilities`` (``ldm.inference.capabilities``). ``pipe.generate(request)`` checks a
``GenerationRequest`` (``ldm.inference.request``) once and draws it in chunks of ``batch_size`` (image i from
seed + i), returning a ``Generation``: PIL images, seeds and each image's PNG parameters. The keyword forms
(``pipe(prompts, steps=…)``, ``generate_tensors``) build the same request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm.core.dtypes import resolve_dtype
from ldm.core.images import to_pil
from ldm.diffusion import Schedule
from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.control_image import DEFAULT_CONTROL_SCALE  # noqa: F401  (re-exported)
from ldm.inference.draw import conditioning, draw_latents
from ldm.inference.generation import Generation, image_parameters
from ldm.inference.loaders import (  # noqa: F401  (re-exported: the pipeline's public names)
    DEFAULT_RUN,
    NotAnLDMRunError,
    PipelineError,
    RunSummary,
    describe_run,
    load_classifier,
    resolve_device,
)
from ldm.inference.lora_files import add_live_lora, fold_lora, read_lora_file
from ldm.inference.request import (  # noqa: F401  (re-exported)
    DEFAULT_BATCH_SIZE,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    CheckedRequest,
    GenerationRequest,
    check_conditions,
    check_request,
)
from ldm.inference.sd import guess_sd_config, load_sd  # noqa: F401  (guess_sd_config re-exported)
from ldm.inference.sd_base import load_run_system
from ldm.nets.compile import compile_network, is_compiled

SCALE_RTOL = 1e-4  # a classifier's latent scale must be the model's (the same cache measures both)
DECODE_CHUNK = 16  # images decoded at once: bounds the VAE decoder's peak memory


@dataclass
class Pipeline:
    """The modules sampling needs, however they were loaded, and what they can do (``capabilities``)."""

    model: nn.Module  # DiffusionWrapper: model(x_t, t, context=…) → network output
    cond_stage_model: nn.Module
    first_stage_model: nn.Module
    schedule: Schedule
    parameterization: str
    scale_factor: float
    image_size: int
    source: dict = field(default_factory=dict)  # where the weights came from (run, checkpoint, ema), for metadata
    control_model: nn.Module | None = None  # a ControlNet (then every request needs a control image)
    only_mid_control: bool = False
    control_scales: list[float] | None = None  # per-residual scales a ControlNet was trained with (× control_scale)
    classifier: nn.Module | None = None  # a noise-aware classifier for classifier guidance (``with_classifier``)
    classifier_schedule: Schedule | None = None  # the path it was trained on
    capabilities: ModelCapabilities | None = None

    @classmethod
    def from_system(cls, system: nn.Module) -> Pipeline:
        """Share the modules of a LatentDiffusion system, or of a ControlLDM with its ControlNet (no copies)."""
        caps = ModelCapabilities.of_system(system)
        return cls(system.model, system.cond_stage_model, system.first_stage_model, system.schedule,
                   system.parameterization, float(system.scale_factor), int(system.image_size),
                   control_model=system.control_model if caps.control else None,
                   only_mid_control=bool(caps.control and system.only_mid_control),
                   control_scales=system.control_scales if caps.control else None, capabilities=caps)

    @classmethod
    def from_run(cls, run: str | os.PathLike = DEFAULT_RUN, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True) -> Pipeline:
        """Load a stage-2 or ControlNet run (or a .ckpt inside one), the EMA weights unless ``use_ema=False``; all
        weights strictly from the run's checkpoint; ``dtype`` for the U-Net, ControlNet and VAE (text and samplers fp32)."""
        info = describe_run(run)
        system, ema = load_run_system(info, use_ema)
        if system.lora is not None:
            system.merge_lora()  # a LoRA run samples as one set of weights: nothing extra per step
        device = resolve_device(device)
        pipe = cls.from_system(system)
        pipe.source = {"run": str(info.run_dir), "checkpoint": str(info.checkpoint), "ema": ema}
        return pipe.to(device, resolve_dtype(dtype, device))

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, config: str | os.PathLike | dict | None = None,
                        controlnet: str | os.PathLike | None = None, unsafe: bool = False,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        use_ema: bool = True, vae: str | os.PathLike | None = None) -> Pipeline:
        """Load a public Stable Diffusion file (+ a ControlNet file) with its inference config, strictly (None: guessed
        for SD 1.x or carried by an exported file); ``unsafe`` allows pickles that run code (``--unsafe-load``)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = guess_sd_config(ckpt, unsafe) if config is None else config
        system = load_sd(config, ckpt, device=device, dtype=dtype, use_ema=use_ema, unsafe=unsafe,
                         controlnet=controlnet, vae=vae)
        pipe = cls.from_system(system)
        pipe.source = {"checkpoint": str(ckpt), "config": None if isinstance(config, dict) else config and str(config),
                       "controlnet": str(controlnet) if controlnet else None,
                       "ema": system.checkpoint_info.get("ema")}
        return pipe.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move every module to ``device``; cast the U-Net, ControlNet and VAE to ``dtype``. Eval mode, no gradients."""
        control = [self.control_model] if self.control_model is not None else []
        for module in (self.model, self.cond_stage_model, self.first_stage_model, self.schedule, *control):
            module.to(device).eval().requires_grad_(False)
        for module in (self.model, self.first_stage_model, *control) if dtype is not None else ():
            module.to(dtype)  # the U-Net casts its inputs to its weights' dtype and returns fp32
        return self

    def compile(self) -> Pipeline:
        """torch.compile the U-Net (and ControlNet) in place with frozen weights, for sampling only (call it last)."""
        for network in (self.model.diffusion_model, self.control_model):
            if network is not None and not is_compiled(network):
                compile_network(network, self.device, inference=True)
        return self

    def with_lora(self, path: str | os.PathLike, scale: float = 1.0, live: bool = False, unsafe: bool = False
                  ) -> Pipeline:
        """Apply a LoRA file (kohya's or diffusers' layout) to the U-Net and a CLIP text tower: folded into the
        weights, or with ``live`` as a peft adapter (several add up). Recorded in ``source``."""
        text = getattr(self.cond_stage_model, "model", None)  # a CLIP tower (class embedders have none)
        weights = read_lora_file(path, self.model.diffusion_model, text, unsafe)
        applied = self.source.setdefault("lora", [])
        if live:
            add_live_lora(weights, self.model.diffusion_model, text, f"lora{len(applied)}", scale)
        else:
            fold_lora(weights, self.model.diffusion_model, text, scale)
        applied.append({"file": str(path), "scale": scale, "mode": "live" if live else "fold"})
        return self

    def with_classifier(self, run: str | os.PathLike) -> Pipeline:
        """Attach a noise-aware classifier run for classifier guidance (``classifier_scale`` in a request)."""
        classifier, schedule, scale_factor = load_classifier(run)
        if not math.isclose(scale_factor, self.scale_factor, rel_tol=SCALE_RTOL):
            raise PipelineError(f"the classifier {run} was trained on latents scaled by {scale_factor:.5f}, this model's "
                                f"are scaled by {self.scale_factor:.5f}: train it on this model's latent cache")
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)
        self.classifier_schedule = schedule.to(self.device)
        self.source["classifier"] = str(run)
        self.capabilities = self.capabilities.with_classifier()
        return self

    # ------------------------------------------------------------------------------------ what it is

    @property
    def device(self) -> torch.device:
        """The device the U-Net lives on."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's weights' dtype."""
        return next(self.model.parameters()).dtype

    @property
    def condition_key(self) -> str:
        """``"caption"`` for a text model, ``"label"`` for a class model."""
        return self.capabilities.condition_key

    @property
    def n_classes(self) -> int | None:
        """The number of classes of a class model (None for text)."""
        return self.capabilities.n_classes

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height × width pixels."""
        return self.check(GenerationRequest([""] if not self.capabilities.is_class_model else [0],
                                            height=height, width=width)).shape

    def check_conditions(self, conditions: Sequence | str | int, what: str = "condition") -> list:
        """Prompts for a text model, integer labels in range for a class model; raises PipelineError otherwise."""
        return check_conditions(conditions, self.capabilities, what)

    @torch.no_grad()
    def encode(self, conditions: Sequence) -> torch.Tensor:
        """Cross-attention context (N, T, D) for prompts or labels (tokenizing warns on truncated prompts)."""
        return conditioning(self, list(conditions))["context"]

    def check(self, request: GenerationRequest) -> CheckedRequest:
        """The request checked against this model (PipelineError when it cannot be drawn), its images prepared."""
        if request.loras and [(str(p), float(s)) for p, s in request.loras] != [
                (lora["file"], float(lora["scale"])) for lora in self.source.get("lora", [])]:
            raise PipelineError("the request's LoRA files are not the ones applied: load them with with_lora first")
        return check_request(request, self.capabilities)

    # ------------------------------------------------------------------------------------ drawing

    def iter_generate(self, request: GenerationRequest | Sequence | str | int, progress: bool = False,
                      callback: Callable[[dict], None] | None = None, **options) -> Iterator[Generation]:
        """``generate`` one chunk of ``batch_size`` images at a time (to save or show them as they come); checks first."""
        plan = self.check(as_request(request, options))
        return self._generations(plan, progress, callback)

    def generate(self, request: GenerationRequest | Sequence | str | int, progress: bool = False,
                 callback: Callable[[dict], None] | None = None, **options) -> Generation:
        """PIL images with their seeds, settings and PNG parameters; ``callback`` gets each sampler step's state.

        Give a ``GenerationRequest``, or conditions and the request's fields as keywords (others: the sampler's).
        """
        parts = list(self.iter_generate(request, progress, callback, **options))
        negatives = [c for p in parts for c in p.negative] if parts[0].negative is not None else None
        return Generation([im for p in parts for im in p.images], [s for p in parts for s in p.seeds],
                          [c for p in parts for c in p.conditions], negatives, parts[0].settings,
                          [d for p in parts for d in p.parameters])

    def __call__(self, conditions: Sequence | str | int, **options) -> list[Image.Image]:
        """PIL images for prompts (or class labels); image i starts from seed + i (also in ``image.info``)."""
        return self.generate(conditions, **options).images

    def generate_tensors(self, conditions: Sequence | GenerationRequest, progress: bool = False,
                         callback: Callable[[dict], None] | None = None, **options) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] on the CPU; image i starts from seed + i (a stochastic sampler's noise from
        the chunk's first seed, so with ``batch_size=1`` every image reproduces alone from its own seed)."""
        plan = self.check(as_request(conditions, options))
        return torch.cat([images for _, images in self._chunks(plan, progress, callback)])

    @torch.no_grad()
    def latents_for(self, conditions: Sequence, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER, seed: int = 0,
                    callback: Callable[[dict], None] | None = None, **options) -> torch.Tensor:
        """The sampled latents (N, C, h, w) that unit ``noise`` (N, C, h, w) becomes for ``conditions`` (reflow's
        pairs); one batch, no decoding."""
        plan = self.check(GenerationRequest.of(conditions, seed, steps=steps, guidance=guidance, sampler=sampler,
                                               batch_size=len(noise), **options))
        if tuple(noise.shape[1:]) != plan.shape:
            raise PipelineError(f"noise of shape {tuple(noise.shape[1:])} for latents of shape {plan.shape}")
        return draw_latents(self, plan, plan.conditions, None, None, None, seed, callback, noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale and decode latents in chunks → images (N, 3, H, W) clamped to [-1, 1]."""
        z = latents / self.scale_factor
        images = [self.first_stage_model.decode(chunk) for chunk in z.split(DECODE_CHUNK)]
        return torch.cat(images).clamp(-1, 1)

    def _chunks(self, plan: CheckedRequest, progress: bool,
                callback: Callable[[dict], None] | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of the chunk's first image, its images (B, 3, H, W) on the CPU) per chunk."""
        n, size, seed = len(plan.conditions), plan.request.batch_size, plan.request.seed
        with tqdm(total=math.ceil(n / size) * plan.request.steps, disable=not progress, unit="step",
                  desc=f"sampling {n} image(s)") as bar:
            def report(info: dict) -> None:
                bar.update()
                if callback is not None:
                    callback(info)

            for start in range(0, n, size):
                end = min(start + size, n)
                negative = plan.negative[start:end] if plan.negative else None
                control = plan.control.part(start, end) if plan.control is not None else None
                edit = plan.edit.part(start, end) if plan.edit is not None else None
                latents = draw_latents(self, plan, plan.conditions[start:end], negative, control, edit, seed + start,
                                       report)
                yield start, self.decode(latents).float().cpu()

    def _generations(self, plan: CheckedRequest, progress: bool, callback) -> Iterator[Generation]:
        settings, dtype = plan.settings(), str(self.dtype).removeprefix("torch.")
        for start, tensors in self._chunks(plan, progress, callback):
            part = slice(start, start + len(tensors))
            seeds = [plan.request.seed + i for i in range(part.start, part.stop)]
            negatives = plan.negative[part] if plan.negative else None
            images = to_pil(tensors)
            params = []
            for j, (image, s, c) in enumerate(zip(images, seeds, plan.conditions[part])):
                image.info.update(seed=s, condition=c)
                params.append(image_parameters(plan, self.capabilities, self.source, dtype, c, s,
                                               negatives[j] if negatives else None))
            yield Generation(images, seeds, plan.conditions[part], negatives, settings, params)


def as_request(request: GenerationRequest | Sequence | str | int, options: dict) -> GenerationRequest:
    """A request as given, or built from conditions and keywords (``GenerationRequest.of``)."""
    if isinstance(request, GenerationRequest):
        if options:
            raise PipelineError(f"give the settings in the request, not as keywords: {', '.join(options)}")
        return request
    return GenerationRequest.of(request, **options)
