"""Text- (or class-) to-image: conditions → CFG denoiser → sampler → unscale → VAE decode → images.

``Pipeline.from_run("runs/ldm/latest")`` loads a stage-2 run (EMA weights by default) for sampling;
``Pipeline.from_system(system)`` shares a live LatentDiffusion's modules (its sample grids). Requests are
drawn in chunks of ``batch_size`` so memory stays bounded; image i of a call starts from seed + i.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm.checkpoints import load_file, load_strict, state_dict_of
from ldm.config import get_obj_from_str, instantiate_from_config
from ldm.diffusion import SAMPLERS, NoiseSchedule, cfg_denoiser, make_denoiser, sample
from ldm.errors import UserError
from ldm.images import to_pil
from ldm.runs import RunError, checkpoint_for, resolve_run, run_config

DEFAULT_RUN = "runs/ldm/latest"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_BATCH_SIZE = 8  # images sampled at once (CFG doubles the U-Net's batch)
DECODE_CHUNK = 16  # images decoded at once: bounds the VAE decoder's peak memory
STAGE2_TARGET = "ldm.systems.latent_diffusion.LatentDiffusion"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class PipelineError(UserError, ValueError):
    """A request the pipeline cannot draw: bad size, steps, guidance, sampler or conditions."""


class NotAnLDMRunError(PipelineError):
    """A run directory that holds no stage-2 (latent diffusion) model, e.g. a VAE run."""


@dataclass(frozen=True)
class RunSummary:
    """What a stage-2 run draws, read from its config alone (nothing heavy is built)."""

    run_dir: Path
    checkpoint: Path
    config: dict
    condition_key: str  # "caption" (text run) or "label" (class run)
    n_classes: int | None
    first_stage: str
    downsampling_factor: int | None  # from the VAE run's config, when it says


def describe_run(run: str | os.PathLike = DEFAULT_RUN) -> RunSummary:
    """Check that ``run`` (a run directory, ``runs/ldm/latest`` or a .ckpt inside one) is a stage-2 run; summarise it."""
    run_dir = resolve_run(run)
    cfg = run_config(run_dir)
    node = cfg.get("model") or {}
    target = node.get("target", "")
    system_cls = get_obj_from_str(STAGE2_TARGET)
    if not isinstance(target, str) or not _is_subclass(target, system_cls):
        raise NotAnLDMRunError(f"{run} is not a stage-2 (latent diffusion) run: its model is {target or 'missing'}; "
                               f"name a run under runs/ldm/ (e.g. {DEFAULT_RUN})")
    params = node.get("params") or {}
    first_stage = params.get("first_stage")
    if not first_stage:
        raise NotAnLDMRunError(f"{run}: model.params.first_stage is empty, so there is no VAE to decode with")
    cond = params.get("cond_stage") or {}
    cond_params = cond.get("params") or {}
    key = cond_params.get("key") or _default_argument(cond.get("target", ""), "key") or "caption"
    n_classes = cond_params.get("n_classes") if key == "label" else None
    return RunSummary(run_dir, checkpoint_for(run), cfg, key, n_classes, str(first_stage),
                      _vae_factor(_vae_config(first_stage, run)))


def _is_subclass(target: str, base: type) -> bool:
    try:
        cls = get_obj_from_str(target)
    except UserError:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _default_argument(target: str, name: str):
    """The default of constructor argument ``name`` of a config target (None when it has none)."""
    try:
        param = inspect.signature(get_obj_from_str(target)).parameters.get(name)
    except (UserError, TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _vae_config(first_stage: str, run: str | os.PathLike) -> dict:
    """The VAE run's model node (architecture only: its weights come from the stage-2 checkpoint)."""
    try:
        return run_config(first_stage)["model"]
    except RunError as e:
        raise RunError(f"the VAE run {first_stage} that {run} was trained with (model.params.first_stage) is gone "
                       f"({e}); restore its folder (its config.yaml is enough)") from e


def _vae_factor(node: dict) -> int | None:
    """f = 2^(len(ch_mult) − 1), as AutoencoderKL.downsampling_factor, when the config names ch_mult."""
    ch_mult = ((node.get("params") or {}).get("ddconfig") or {}).get("ch_mult")
    return 2 ** (len(ch_mult) - 1) if ch_mult else None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name ("fp32", "bf16", "fp16"), a dtype, None (fp32) or "auto" (bf16 on CUDA, else fp32)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PipelineError(f"dtype {dtype} is not supported; choose float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; choose one of auto, fp32, bf16, fp16")
    return DTYPES[dtype]


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
    schedule: NoiseSchedule
    parameterization: str
    scale_factor: float
    image_size: int
    source: dict = field(default_factory=dict)  # where the weights came from (run, checkpoint, ema), for metadata

    @classmethod
    def from_system(cls, system: nn.Module) -> "Pipeline":
        """Share the modules of a LatentDiffusion system (no copies)."""
        return cls(system.model, system.cond_stage_model, system.first_stage_model, system.schedule,
                   system.parameterization, float(system.scale_factor), int(system.image_size))

    @classmethod
    def from_run(cls, run: str | os.PathLike = DEFAULT_RUN, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True) -> "Pipeline":
        """Load a stage-2 run (or a .ckpt inside one) for sampling, the EMA weights in the U-Net unless ``use_ema=False``.

        The VAE's architecture comes from its run's config; all weights (VAE included) from the stage-2
        checkpoint, loaded strictly. ``dtype`` (fp32 / bf16 / fp16) applies to the U-Net and the VAE; the text
        encoder and the samplers' arithmetic stay fp32.
        """
        info = describe_run(run)
        system = instantiate_from_config(info.config["model"], "model", first_stage=None)
        vae_node = _vae_config(info.first_stage, run)
        system.first_stage_model = instantiate_from_config(
            {"target": vae_node["target"], "params": {**(vae_node.get("params") or {}), "loss": None}}, "first_stage")
        system.first_stage_spec = info.first_stage
        load_strict(system, state_dict_of(load_file(info.checkpoint)), f"stage-2 checkpoint {info.checkpoint}")
        ema = use_ema and system.model_ema is not None
        if ema:
            system.model_ema.copy_to(system.model)
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipe = cls.from_system(system)
        pipe.source = {"run": str(info.run_dir), "checkpoint": str(info.checkpoint), "ema": ema}
        return pipe.to(device, resolve_dtype(dtype, device))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move every module to ``device``; cast the U-Net and the VAE to ``dtype``. Eval mode, no gradients."""
        for module in (self.model, self.cond_stage_model, self.first_stage_model, self.schedule):
            module.to(device).eval().requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype)  # the U-Net casts its inputs to its weights' dtype and returns fp32
            self.first_stage_model.to(dtype)
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

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height × width pixels."""
        factor = self.downsampling_factor
        if not height or not width:
            raise PipelineError("the run does not record its image size: give the height and width in pixels")
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise PipelineError(f"image size {height}×{width} is not a positive multiple of the VAE's factor {factor}")
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

    # ------------------------------------------------------------------------------------ sampling

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
        **sampler_options,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] on the CPU for N prompts or labels; image i starts from seed + i.

        Drawn ``batch_size`` at a time. A stochastic sampler's noise comes from a generator seeded with the
        chunk's first seed, so with ``batch_size=1`` every image reproduces alone from its own seed.
        """
        conditions, negative, shape = self._prepare(conditions, negative, steps, guidance, sampler, batch_size,
                                                    height, width, sampler_options)
        chunks = self._iter_chunks(conditions, negative, seed, shape, steps, guidance, sampler, guidance_rescale,
                                   progress, batch_size, callback, sampler_options)
        return torch.cat([images for _, images in chunks])

    def _prepare(self, conditions, negative, steps: int, guidance: float, sampler: str, batch_size: int,
                 height: int | None, width: int | None, options: dict) -> tuple[list, list | None, tuple]:
        """Check a request before anything is drawn: (conditions, negatives, latent shape (C, h, w))."""
        conditions = self.check_conditions(conditions)
        negative = self._negatives(negative, len(conditions))
        self._check_sampling(steps, guidance, sampler, batch_size, options)
        return conditions, negative, self.latent_shape(height or self.image_size, width or self.image_size)

    def _iter_chunks(self, conditions: list, negative: list | None, seed: int, shape: tuple[int, int, int],
                     steps: int, guidance: float, sampler: str, guidance_rescale: float, progress: bool,
                     batch_size: int, callback: Callable[[dict], None] | None,
                     options: dict) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of the chunk's first image, its images (B, 3, H, W) on the CPU) per chunk."""
        n = len(conditions)
        chunks = math.ceil(n / batch_size)
        with tqdm(total=chunks * steps, disable=not progress, unit="step", desc=f"sampling {n} image(s)") as bar:
            def report(info: dict) -> None:
                bar.update()
                if callback is not None:
                    callback(info)

            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                with torch.no_grad():
                    latents = self._sample_chunk(
                        conditions[start:end], negative[start:end] if negative else None, seed + start, shape,
                        steps, guidance, sampler, guidance_rescale, report, options)
                    images = self.decode(latents).float().cpu()
                yield start, images

    def _sample_chunk(self, conditions: list, negative: list | None, seed: int, shape: tuple[int, int, int],
                      steps: int, guidance: float, sampler: str, guidance_rescale: float,
                      callback: Callable[[dict], None], options: dict) -> torch.Tensor:
        """Latents (B, C, h, w) for one chunk; image j's noise from seed + j."""
        device, b = self.device, len(conditions)
        context = self.encode(conditions)  # (B, T, D)
        uncond = None  # scale 1 never runs the unconditional branch
        if guidance != 1:
            uncond = self.encode(negative if negative is not None else self.cond_stage_model.null_condition(b))
        noise = torch.stack([  # (B, C, h, w): each image's noise from its own seed
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(b)
        ]).to(device)
        denoiser = cfg_denoiser(make_denoiser(self.model, self.schedule, self.parameterization),
                                {"context": context}, {"context": uncond}, guidance, guidance_rescale,
                                rescale_space=self.parameterization)
        generator = torch.Generator(device).manual_seed(seed)
        return sample(sampler, denoiser, noise, self.schedule, steps, generator=generator, callback=callback,
                      **options).x

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
                      **sampler_options) -> Iterator[Generation]:
        """``generate`` one chunk of ``batch_size`` images at a time (to save them as they come); checks first."""
        height, width = height or self.image_size, width or self.image_size
        conditions, negatives, shape = self._prepare(conditions, negative, steps, guidance, sampler, batch_size,
                                                     height, width, sampler_options)
        chunks = self._iter_chunks(conditions, negatives, seed, shape, steps, guidance, sampler, guidance_rescale,
                                   progress, batch_size, None, sampler_options)
        settings = dict(steps=steps, guidance=guidance, sampler=sampler, guidance_rescale=guidance_rescale,
                        height=height, width=width, **sampler_options)
        return self._generations(chunks, conditions, negatives, seed, settings)

    @staticmethod
    def _generations(chunks: Iterator[tuple[int, torch.Tensor]], conditions: list, negatives: list | None,
                     seed: int, settings: dict) -> Iterator[Generation]:
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
                 **sampler_options) -> Generation:
        """PIL images with their seeds and settings (each image's ``info`` holds its seed and condition)."""
        parts = list(self.iter_generate(conditions, steps, guidance, seed, sampler, negative, height, width,
                                        guidance_rescale, batch_size, progress, **sampler_options))
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
