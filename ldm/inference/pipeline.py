"""Text- (or class-) to-image: conditions → CFG denoiser → sampler → unscale → VAE decode → images.

``Pipeline.from_run("runs/ldm/latest")`` loads a stage-2 or ControlNet run (EMA weights by default);
``Pipeline.from_checkpoint(ckpt, config, controlnet=…)`` a public Stable Diffusion (+ ControlNet) file;
``Pipeline.from_system(system)`` shares a live system's modules (its sample grids). Requests are drawn in
chunks of ``batch_size`` so memory stays bounded; image i of a call starts from seed + i. A ControlNet model
takes a control image (``control=``, resized to the output size), ``control_scale`` and ``guess_mode``
(ControlNet's: the hint in the conditional branch only, residual i of 13 scaled 0.825^(12 − i)).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm.core.dtypes import resolve_dtype
from ldm.core.images import to_pil
from ldm.diffusion import SAMPLERS, Denoiser, Schedule, sample_latents
from ldm.diffusion.classifier_guidance import ClassifierGuidance
from ldm.inference.control_image import (
    DEFAULT_CONTROL_SCALE,
    ControlInput,
    ControlSettings,
    prepare_hints,
)
from ldm.inference.loaders import (  # noqa: F401  (re-exported: the pipeline's public names)
    DEFAULT_RUN,
    NotAnLDMRunError,
    PipelineError,
    RunSummary,
    describe_run,
    load_classifier,
    resolve_device,
)
from ldm.inference.lora_files import add_live_lora, fold_lora, read_lora_file, text_towers
from ldm.inference.sd import guess_sd_config, load_sd
from ldm.inference.sd_base import load_run_system
from ldm.inference.sd_control import sampling_model
from ldm.inference.sdxl_sizes import request_sizes
from ldm.nets.compile import compile_network, is_compiled
from ldm.nets.conditioning.sdxl import SizeConditioning

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_BATCH_SIZE = 8  # images sampled at once (CFG doubles the U-Net's batch)
SCALE_RTOL = 1e-4  # a classifier's latent scale must be the model's (the same cache measures both)
DECODE_CHUNK = 16  # images decoded at once: bounds the VAE decoder's peak memory


@dataclass
class Generation:
    """One call's images with everything needed to reproduce them: image i is ``conditions[i]`` from ``seeds[i]``."""

    images: list[Image.Image]
    seeds: list[int]
    conditions: list
    negative: list | None
    settings: dict  # steps, guidance, sampler, guidance_rescale, height, width, sampler options


@dataclass
class Pipeline:
    """The modules sampling needs, however they were loaded (a stage-2 run, a live system, an SD file)."""

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

    @classmethod
    def from_system(cls, system: nn.Module) -> Pipeline:
        """Share the modules of a LatentDiffusion system, or of a ControlLDM with its ControlNet (no copies)."""
        return cls(system.model, system.cond_stage_model, system.first_stage_model, system.schedule,
                   system.parameterization, float(system.scale_factor), int(system.image_size),
                   control_model=getattr(system, "control_model", None),
                   only_mid_control=bool(getattr(system, "only_mid_control", False)),
                   control_scales=getattr(system, "control_scales", None))

    @classmethod
    def from_run(cls, run: str | os.PathLike = DEFAULT_RUN, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True) -> Pipeline:
        """Load a stage-2 or ControlNet run (or a .ckpt inside one), the EMA weights unless ``use_ema=False``.

        The VAE's architecture comes from its run's config; all weights (VAE included) from the run's
        checkpoint, loaded strictly. ``dtype`` (fp32 / bf16 / fp16) applies to the U-Net, the ControlNet and
        the VAE; the text encoder and the samplers' arithmetic stay fp32.
        """
        info = describe_run(run)
        system, ema = load_run_system(info, use_ema)
        if getattr(system, "lora", None) is not None:
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
        """Load a public Stable Diffusion file (+ a ControlNet file) with an inference config, strictly.

        ``config``: configs/sd/*.yaml or a loaded config; None guesses it (SD 1.x, or the config an exported
        file carries). ``unsafe`` allows pickles that run code (the CLI's ``--unsafe-load``); without it such
        a file is refused. A ControlNet (``controlnet``, or ``control_model.*`` in the file) makes a ControlLDM.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if config is None:
            config = guess_sd_config(ckpt, unsafe)
        system = load_sd(config, ckpt, device=device, dtype=dtype, use_ema=use_ema, unsafe=unsafe,
                         controlnet=controlnet, vae=vae)
        pipe = cls.from_system(system)
        info = getattr(system, "checkpoint_info", {})
        pipe.source = {"checkpoint": str(ckpt), "config": None if isinstance(config, dict) else config and str(config),
                       "controlnet": str(controlnet) if controlnet else None, "ema": info.get("ema")}
        return pipe.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move every module to ``device``; cast the U-Net, ControlNet and VAE to ``dtype``. Eval mode, no gradients."""
        control = [self.control_model] if self.control_model is not None else []
        for module in (self.model, self.cond_stage_model, self.first_stage_model, self.schedule, *control):
            module.to(device).eval().requires_grad_(False)
        if dtype is not None:
            for module in (self.model, self.first_stage_model, *control):
                module.to(dtype)  # the U-Net casts its inputs to its weights' dtype and returns fp32
        return self

    def compile(self) -> Pipeline:
        """torch.compile the U-Net (and ControlNet) in place with frozen weights, for sampling only.

        The first call with new shapes compiles (tens of seconds on a CPU), later ones run faster
        (``python scripts/bench.py --only sampling``). Call it last: the weights must not change afterwards.
        """
        for network in (self.model.diffusion_model, self.control_model):
            if network is not None and not is_compiled(network):
                compile_network(network, self.device, inference=True)
        return self

    # ------------------------------------------------------------------------------------ properties

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
        """``"caption"`` for a text run, ``"label"`` for a class run."""
        return self.cond_stage_model.key

    @property
    def n_classes(self) -> int | None:
        """The number of classes of a class run (None for text)."""
        return getattr(self.cond_stage_model, "n_classes", None)

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return self.first_stage_model.downsampling_factor

    @property
    def size_step(self) -> int:
        """What image sides must be multiples of: the VAE's factor × the U-Net's total downsampling."""
        levels = len(getattr(self.model.diffusion_model, "config", {}).get("channel_mult") or (1,))
        return self.downsampling_factor * 2 ** (levels - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height × width pixels (sides multiples of ``size_step``)."""
        factor, step = self.downsampling_factor, self.size_step
        if not height or not width:
            raise PipelineError("the run does not record its image size: give the height and width in pixels")
        if height <= 0 or width <= 0 or height % step or width % step:
            near_w, near_h = (max(step, (side + step // 2) // step * step) for side in (width, height))
            raise PipelineError(f"image size {width}×{height} (width×height) is not a positive multiple of {step} "
                                f"(the VAE's factor {factor} × the U-Net's downsampling {step // factor}); "
                                f"e.g. {near_w}×{near_h}")
        return self.model.diffusion_model.in_channels, height // factor, width // factor

    # ------------------------------------------------------------------------------------ checks

    def check_conditions(self, conditions: Sequence | str | int, what: str = "condition") -> list:
        """Prompts for a text run, integer labels in range for a class run; raises PipelineError otherwise."""
        if isinstance(conditions, torch.Tensor):
            conditions = conditions.reshape(-1).tolist()
        conditions = [conditions] if isinstance(conditions, (str, numbers.Integral)) else list(conditions)
        if not conditions:
            raise PipelineError(f"no {what}s given")
        if self.condition_key == "label":
            bad = [c for c in conditions if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
            if bad:
                raise PipelineError(f"this run is class-conditional: give integer class labels, not {bad[0]!r}")
            conditions = [int(c) for c in conditions]
            n = self.n_classes
            out = [c for c in conditions if n is not None and not 0 <= c < n]
            if out:
                raise PipelineError(f"class {out[0]} is out of range: this run has classes 0..{n - 1}")
        elif any(not isinstance(c, str) for c in conditions):
            bad = next(c for c in conditions if not isinstance(c, str))
            raise PipelineError(f"this run is text-conditional: give prompts (str), not {bad!r}")
        return conditions

    @torch.no_grad()
    def encode(self, conditions: Sequence) -> torch.Tensor:
        """Cross-attention context (N, T, D) for prompts or labels (tokenizing warns on truncated prompts)."""
        cond = torch.as_tensor(conditions, device=self.device) if self.condition_key == "label" else list(conditions)
        return self.cond_stage_model(cond)

    @torch.no_grad()
    def conditioning(self, conditions: Sequence, sizes: SizeConditioning | None = None) -> dict[str, torch.Tensor]:
        """The network's conditioning by name for prompts or labels: ``{"context"}``, and SDXL's ``"y"``."""
        cond = torch.as_tensor(conditions, device=self.device) if self.condition_key == "label" else list(conditions)
        return self.cond_stage_model.conditioning(cond, sizes)

    def _negatives(self, negative: Sequence | str | int | None, n: int) -> list | None:
        if negative is None:
            return None
        negative = [negative] * n if isinstance(negative, (str, numbers.Integral)) else list(negative)
        if len(negative) != n:
            raise PipelineError(f"{len(negative)} negative conditions for {n} images")
        return self.check_conditions(negative, "negative condition")

    @staticmethod
    def _check_sampling(steps: int, guidance: float, sampler: str, batch_size: int, options: dict) -> None:
        if sampler not in SAMPLERS:
            raise PipelineError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if steps < 1:
            raise PipelineError(f"steps must be at least 1, got {steps}")
        if guidance < 0:
            raise PipelineError(f"guidance scale must be ≥ 0, got {guidance}")
        if batch_size < 1:
            raise PipelineError(f"batch size must be at least 1, got {batch_size}")
        accepted = inspect.signature(SAMPLERS[sampler]).parameters
        unknown = [k for k in options if k not in accepted or k in ("generator", "callback", "progress")]
        if unknown:
            raise PipelineError(f"sampler {sampler!r} takes no option {unknown[0]!r}")

    def _control(self, control: ControlInput | Sequence[ControlInput] | None, n: int, height: int, width: int,
                 scale: float, guess_mode: bool) -> ControlSettings | None:
        """The prepared control request (None for a model without a ControlNet); PipelineError when it does not fit."""
        if self.control_model is None:
            if control is not None:
                raise PipelineError("this model has no ControlNet, so it takes no control image: load a ControlNet "
                                    "run (runs/controlnet/…) or pass a ControlNet file (controlnet=, --controlnet)")
            return None
        if control is None:
            raise PipelineError("this model is a ControlNet: give a control image (control=…, --control), e.g. an "
                                "edge map from scripts/make_edges.py")
        if not scale >= 0:
            raise PipelineError(f"control scale must be ≥ 0, got {scale}")
        return ControlSettings(prepare_hints(control, n, height, width), float(scale), bool(guess_mode))

    def with_lora(self, path: str | os.PathLike, scale: float = 1.0, live: bool = False, unsafe: bool = False
                  ) -> Pipeline:
        """Apply a LoRA file (kohya's or diffusers' layout, ``ldm.inference.lora_files``) to the U-Net and a CLIP text
        tower: folded into the weights, or with ``live`` as a peft adapter (several add up). Recorded in ``source``."""
        text = text_towers(self.cond_stage_model)  # SD's CLIP tower, or SDXL's two
        weights = read_lora_file(path, self.model.diffusion_model, text, unsafe)
        applied = self.source.setdefault("lora", [])
        if live:
            add_live_lora(weights, self.model.diffusion_model, text, f"lora{len(applied)}", scale)
        else:
            fold_lora(weights, self.model.diffusion_model, text, scale)
        applied.append({"file": str(path), "scale": scale, "mode": "live" if live else "fold"})
        return self

    def with_classifier(self, run: str | os.PathLike) -> Pipeline:
        """Attach a noise-aware classifier run (``stages/train_classifier.py``) for classifier guidance: then
        ``classifier_scale=s`` in a request steers each image toward its class label."""
        classifier, schedule, scale_factor = load_classifier(run)
        if not math.isclose(scale_factor, self.scale_factor, rel_tol=SCALE_RTOL):
            raise PipelineError(f"the classifier {run} was trained on latents scaled by {scale_factor:.5f}, this model's "
                                f"are scaled by {self.scale_factor:.5f}: train it on this model's latent cache")
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)
        self.classifier_schedule = schedule.to(self.device)
        self.source["classifier"] = str(run)
        return self

    def _classifier_scale(self, options: dict) -> float:
        """The request's classifier-guidance scale (taken out of the sampler options), checked."""
        scale = float(options.pop("classifier_scale", 0.0))
        if scale and self.classifier is None:
            raise PipelineError("classifier_scale needs a classifier: Pipeline.with_classifier(run), or --classifier")
        if scale and self.condition_key != "label":
            raise PipelineError("classifier guidance steers toward class labels: this run is text-conditional")
        if scale < 0:
            raise PipelineError(f"classifier scale must be ≥ 0, got {scale}")
        return scale

    # ------------------------------------------------------------------------------------ sampling

    def _plan(self, conditions, negative, steps: int, guidance: float, sampler: str, guidance_rescale: float,
              batch_size: int, height: int | None, width: int | None, control, control_scale: float,
              guess_mode: bool, options: dict) -> _Plan:
        """Check a request before anything is drawn and gather what sampling needs."""
        conditions = self.check_conditions(conditions)
        negative = self._negatives(negative, len(conditions))
        options = dict(options)
        classifier_scale = self._classifier_scale(options)
        height, width = height or self.image_size, width or self.image_size
        sizes = request_sizes(self.cond_stage_model, options, height, width)  # SDXL's micro-conditioning
        self._check_sampling(steps, guidance, sampler, batch_size, options)
        shape = self.latent_shape(height, width)
        control = self._control(control, len(conditions), height, width, control_scale, guess_mode)
        return _Plan(conditions, negative, shape, height, width, steps, guidance, sampler, guidance_rescale,
                     batch_size, options, control, classifier_scale, sizes)

    def generate_tensors(
        self,
        conditions: Sequence,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        sampler: str = DEFAULT_SAMPLER,
        seed: int = 0,
        negative: Sequence | str | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_rescale: float = 0.0,
        progress: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        callback: Callable[[dict], None] | None = None,
        control: ControlInput | Sequence[ControlInput] | None = None,
        control_scale: float = DEFAULT_CONTROL_SCALE,
        guess_mode: bool = False,
        **sampler_options,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] on the CPU for N prompts or labels; image i starts from seed + i.

        Drawn ``batch_size`` at a time. A stochastic sampler's noise comes from a generator seeded with the
        chunk's first seed, so with ``batch_size=1`` every image reproduces alone from its own seed.
        ``control`` (a ControlNet model's hint: a path, PIL image or (3, H, W) tensor in [0, 1], or one per
        image) is resized to the output size.
        """
        plan = self._plan(conditions, negative, steps, guidance, sampler, guidance_rescale, batch_size, height,
                          width, control, control_scale, guess_mode, sampler_options)
        return torch.cat([images for _, images in self._iter_chunks(plan, seed, progress, callback)])

    def _iter_chunks(self, plan: _Plan, seed: int, progress: bool,
                     callback: Callable[[dict], None] | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of the chunk's first image, its images (B, 3, H, W) on the CPU) per chunk."""
        n, size = len(plan.conditions), plan.batch_size
        with tqdm(total=math.ceil(n / size) * plan.steps, disable=not progress, unit="step",
                  desc=f"sampling {n} image(s)") as bar:
            def report(info: dict) -> None:
                bar.update()
                if callback is not None:
                    callback(info)

            for start in range(0, n, size):
                end = min(start + size, n)
                negative = plan.negative[start:end] if plan.negative else None
                control = plan.control.part(start, end) if plan.control is not None else None
                with torch.no_grad():
                    latents = self._sample_chunk(plan, plan.conditions[start:end], negative, control, seed + start,
                                                 report)
                    images = self.decode(latents).float().cpu()
                yield start, images

    def _sample_chunk(self, plan: _Plan, conditions: list, negative: list | None, control: ControlSettings | None,
                      seed: int, callback: Callable[[dict], None] | None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) for one chunk; image j's noise from seed + j unless ``noise`` (B, C, h, w) is given."""
        device, b = self.device, len(conditions)
        cond = self.conditioning(conditions, plan.sizes)  # {"context": (B, T, D)} (SDXL: and "y": (B, adm))
        uncond = {}  # scale 1 never runs the unconditional branch
        if plan.guidance != 1:
            uncond = (self.conditioning(negative, plan.sizes) if negative is not None
                      else self.cond_stage_model.unconditional_conditioning(b, plan.sizes))
        model = self.model
        if control is not None:
            model = sampling_model(self, control.scale, control.guess_mode)  # duck-typed: model, control_model, …
            cond["hint"] = control.hints.to(device)  # (1 or B, 3, H, W)
            if not control.guess_mode:  # guess mode: the unconditional branch runs without the hint
                uncond["hint"] = cond["hint"]
        if noise is None:
            noise = torch.stack([  # (B, C, h, w): each image's noise from its own seed
                torch.randn(plan.shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(b)
            ])
        noise = noise.to(device)
        steer = None
        if plan.classifier_scale:
            labels = torch.as_tensor(conditions, device=device)  # (B,)
            steer = ClassifierGuidance(self.classifier, self.classifier_schedule, labels, plan.classifier_scale)
        return sample_latents(Denoiser(model, self.schedule, self.parameterization), noise, cond, uncond,
                              sampler=plan.sampler, steps=plan.steps, guidance=plan.guidance,
                              guidance_rescale=plan.guidance_rescale, generator=torch.Generator(device).manual_seed(seed),
                              callback=callback, classifier_guidance=steer, **plan.options).x

    @torch.no_grad()
    def latents_for(self, conditions: Sequence, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER, seed: int = 0,
                    callback: Callable[[dict], None] | None = None, **options) -> torch.Tensor:
        """The sampled latents (N, C, h, w), in the model's scaled latent space, that unit ``noise`` (N, C, h, w)
        becomes for ``conditions`` (reflow draws its pairs so); one batch, no decoding."""
        plan = self._plan(conditions, None, steps, guidance, sampler, 0.0, len(noise), None, None, None,
                          DEFAULT_CONTROL_SCALE, False, options)
        if tuple(noise.shape[1:]) != plan.shape:
            raise PipelineError(f"noise of shape {tuple(noise.shape[1:])} for latents of shape {plan.shape}")
        return self._sample_chunk(plan, plan.conditions, None, None, seed, callback, noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale and decode latents in chunks → images (N, 3, H, W) clamped to [-1, 1]."""
        z = latents / self.scale_factor
        images = [self.first_stage_model.decode(chunk) for chunk in z.split(DECODE_CHUNK)]
        return torch.cat(images).clamp(-1, 1)

    def iter_generate(self, conditions: Sequence | str | int, steps: int = DEFAULT_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                      negative: Sequence | str | None = None, height: int | None = None, width: int | None = None,
                      guidance_rescale: float = 0.0, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                      control: ControlInput | Sequence[ControlInput] | None = None,
                      control_scale: float = DEFAULT_CONTROL_SCALE, guess_mode: bool = False,
                      **sampler_options) -> Iterator[Generation]:
        """``generate`` one chunk of ``batch_size`` images at a time (to save them as they come); checks first."""
        plan = self._plan(conditions, negative, steps, guidance, sampler, guidance_rescale, batch_size, height,
                          width, control, control_scale, guess_mode, sampler_options)
        return self._generations(self._iter_chunks(plan, seed, progress, None), plan, seed)

    @staticmethod
    def _generations(chunks: Iterator[tuple[int, torch.Tensor]], plan: _Plan, seed: int) -> Iterator[Generation]:
        conditions, negatives, settings = plan.conditions, plan.negative, plan.settings()
        for start, tensors in chunks:
            part = slice(start, start + len(tensors))
            seeds = [seed + i for i in range(part.start, part.stop)]
            images = to_pil(tensors)
            for image, s, c in zip(images, seeds, conditions[part]):
                image.info.update(seed=s, condition=c)
            yield Generation(images, seeds, conditions[part], negatives[part] if negatives else None, settings)

    def generate(self, conditions: Sequence | str | int, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                 negative: Sequence | str | None = None, height: int | None = None, width: int | None = None,
                 guidance_rescale: float = 0.0, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                 **options) -> Generation:
        """PIL images with their seeds and settings (each image's ``info`` holds its seed and condition).

        ``options``: ``control``, ``control_scale``, ``guess_mode`` for a ControlNet, ``classifier_scale`` with a
        classifier attached (``with_classifier``), and the sampler's own.
        """
        parts = list(self.iter_generate(conditions, steps, guidance, seed, sampler, negative, height, width,
                                        guidance_rescale, batch_size, progress, **options))
        negatives = [c for p in parts for c in p.negative] if parts[0].negative is not None else None
        return Generation([im for p in parts for im in p.images], [s for p in parts for s in p.seeds],
                          [c for p in parts for c in p.conditions], negatives, parts[0].settings)

    def __call__(self, conditions: Sequence | str | int, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                 negative: Sequence | str | None = None, height: int | None = None, width: int | None = None,
                 guidance_rescale: float = 0.0, **options) -> list[Image.Image]:
        """PIL images for prompts (or class labels); image i starts from seed + i (also in ``image.info``)."""
        return self.generate(conditions, steps, guidance, seed, sampler, negative, height, width,
                             guidance_rescale, **options).images


@dataclass(frozen=True)
class _Plan:
    """A checked request: what to draw (one condition per image), at which size, how, and with which control."""

    conditions: list
    negative: list | None
    shape: tuple[int, int, int]  # (C, h, w) of the latents
    height: int
    width: int
    steps: int
    guidance: float
    sampler: str
    guidance_rescale: float
    batch_size: int
    options: dict  # the sampler's own keyword arguments (eta, …)
    control: ControlSettings | None
    classifier_scale: float = 0.0
    sizes: SizeConditioning | None = None  # SDXL's original size, crop top-left and target size

    def settings(self) -> dict:
        """The settings a Generation records (control scale and guess mode for a ControlNet, the classifier scale)."""
        control = {} if self.control is None else {"control_scale": self.control.scale,
                                                   "guess_mode": self.control.guess_mode}
        if self.classifier_scale:
            control["classifier_scale"] = self.classifier_scale
        if self.sizes is not None:
            control.update({k: list(v) for k, v in vars(self.sizes).items()})
        return dict(steps=self.steps, guidance=self.guidance, sampler=self.sampler,
                    guidance_rescale=self.guidance_rescale, height=self.height, width=self.width, **control,
                    **self.options)
