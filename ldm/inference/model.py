"""The typed sampling model every loader returns: the modules sampling needs, however they were loaded (a stage-2 or
ControlNet run, a public Stable Diffusion file, a live system), and what they can do (``capabilities``).

``SamplingModel.from_run("runs/ldm/latest")`` loads a run (EMA weights by default); ``from_checkpoint(ckpt, config,
controlnet=…)`` a public SD (+ ControlNet) file, an inpainting one included; ``from_system(system)`` shares a live
system's modules (its sample grids). ``with_lora`` and ``with_classifier`` add to it; ``ldm.inference.pipeline``
draws requests with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from ldm.core.dtypes import resolve_dtype
from ldm.diffusion import Schedule
from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.loaders import DEFAULT_RUN, PipelineError, describe_run, load_classifier, resolve_device
from ldm.inference.lora_files import add_live_lora, fold_lora, read_lora_file, text_towers
from ldm.inference.sd import guess_sd_config, load_sd
from ldm.inference.source_checks import check_carried_config
from ldm.inference.sd_base import load_run_system
from ldm.nets.compile import compile_network, is_compiled

SCALE_RTOL = 1e-4  # a classifier's latent scale must be the model's (the same cache measures both)
DECODE_CHUNK = 16  # images decoded at once: bounds the VAE decoder's peak memory
M = TypeVar("M", bound="SamplingModel")


@dataclass
class SamplingModel:
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
    def from_system(cls: type[M], system: nn.Module) -> M:
        """Share the modules of a LatentDiffusion system, or of a ControlLDM with its ControlNet (no copies)."""
        caps = ModelCapabilities.of_system(system)
        return cls(system.model, system.cond_stage_model, system.first_stage_model, system.schedule,
                   system.parameterization, float(system.scale_factor), int(system.image_size),
                   control_model=system.control_model if caps.control else None,
                   only_mid_control=bool(caps.control and system.only_mid_control),
                   control_scales=system.control_scales if caps.control else None, capabilities=caps)

    @classmethod
    def from_run(cls: type[M], run: str | os.PathLike = DEFAULT_RUN, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True) -> M:
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
    def from_checkpoint(cls: type[M], ckpt: str | os.PathLike, config: str | os.PathLike | dict | None = None,
                        controlnet: str | os.PathLike | None = None, unsafe: bool = False,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        use_ema: bool = True, vae: str | os.PathLike | None = None) -> M:
        """Load a public Stable Diffusion file (+ a ControlNet file) with its inference config, strictly (None: guessed
        for SD 1.x or carried by an exported file); ``unsafe`` allows pickles that run code (``--unsafe-load``)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = guess_sd_config(ckpt, unsafe) if config is None else config
        if config is not None and not isinstance(config, dict):
            check_carried_config(ckpt, config)  # an exported file's own config wins over another: refused
        system = load_sd(config, ckpt, device=device, dtype=dtype, use_ema=use_ema, unsafe=unsafe,
                         controlnet=controlnet, vae=vae)
        pipe = cls.from_system(system)
        pipe.source = {"checkpoint": str(ckpt), "config": None if isinstance(config, dict) else config and str(config),
                       "controlnet": str(controlnet) if controlnet else None,
                       "ema": system.checkpoint_info.get("ema")}
        return pipe.to(device, dtype)

    def to(self: M, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> M:
        """Move every module to ``device``; cast the U-Net, ControlNet and VAE to ``dtype``. Eval mode, no gradients."""
        control = [self.control_model] if self.control_model is not None else []
        for module in (self.model, self.cond_stage_model, self.first_stage_model, self.schedule, *control):
            module.to(device).eval().requires_grad_(False)
        for module in (self.model, self.first_stage_model, *control) if dtype is not None else ():
            module.to(dtype)  # the U-Net casts its inputs to its weights' dtype and returns fp32
        return self

    def compile(self: M) -> M:
        """torch.compile the U-Net (and ControlNet) in place with frozen weights, for sampling only (call it last)."""
        for network in (self.model.diffusion_model, self.control_model):
            if network is not None and not is_compiled(network):
                compile_network(network, self.device, inference=True)
        return self

    def with_lora(self: M, path: str | os.PathLike, scale: float = 1.0, live: bool = False, unsafe: bool = False
                  ) -> M:
        """Apply a LoRA file (kohya's or diffusers' layout) to the U-Net and a CLIP text tower: folded into the
        weights, or with ``live`` as a peft adapter (several add up). Recorded in ``source``."""
        text = text_towers(self.cond_stage_model)  # SD's CLIP tower, SDXL's two (class embedders have none)
        weights = read_lora_file(path, self.model.diffusion_model, text, unsafe)
        applied = self.source.setdefault("lora", [])
        if live:
            add_live_lora(weights, self.model.diffusion_model, text, f"lora{len(applied)}", scale)
        else:
            fold_lora(weights, self.model.diffusion_model, text, scale)
        applied.append({"file": str(path), "scale": scale, "mode": "live" if live else "fold"})
        return self

    def with_classifier(self: M, run: str | os.PathLike) -> M:
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale and decode latents in chunks → images (N, 3, H, W) clamped to [-1, 1]."""
        z = latents / self.scale_factor
        images = [self.first_stage_model.decode(chunk) for chunk in z.split(DECODE_CHUNK)]
        return torch.cat(images).clamp(-1, 1)
