"""Generation as a request to a model: ``GenerationRequest`` → check → sampling core → VAE decode → images.

A ``Pipeline`` is a ``SamplingModel`` (``ldm.inference.model``: ``Pipeline.from_run("runs/ldm/latest")``,
``from_checkpoint(ckpt, config, controlnet=…)``, ``from_system(system)``, each declaring its ``capabilities``) that
draws: ``pipe.generate(request)`` checks a ``GenerationRequest`` (``ldm.inference.request``) once and draws it in
chunks of ``batch_size`` (image i from seed + i, ``ldm.inference.draw``), returning a ``Generation``: PIL images,
seeds and each image's PNG parameters. The keyword forms (``pipe(prompts, steps=…)``, ``generate_tensors``) build
the same request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.core.images import to_pil
from ldm.inference.control_image import DEFAULT_CONTROL_SCALE  # noqa: F401  (re-exported)
from ldm.inference.draw import conditioning, draw_latents
from ldm.inference.generation import Generation, image_parameters
from ldm.inference.loaders import (  # noqa: F401  (re-exported: the pipeline's public names)
    DEFAULT_RUN,
    NotAnLDMRunError,
    PipelineError,
    RunSummary,
    describe_run,
)
from ldm.inference.model import SamplingModel
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
from ldm.inference.sd import guess_sd_config  # noqa: F401  (re-exported)
from ldm.nets.conditioning.sdxl import SizeConditioning


@dataclass
class Pipeline(SamplingModel):
    """A sampling model that draws requests (module docstring)."""

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
        raw = torch.as_tensor(conditions, device=self.device) if self.capabilities.is_class_model else list(conditions)
        out = self.cond_stage_model(raw)  # (an SDXL conditioner's forward is its context alone)
        return out["context"] if isinstance(out, dict) else out

    def conditioning(self, conditions: Sequence, sizes: SizeConditioning | None = None) -> dict[str, torch.Tensor]:
        """The network's conditioning by name for prompts or labels: ``{"context"}``, and SDXL's ``"y"``."""
        return conditioning(self, list(conditions), sizes)

    def check(self, request: GenerationRequest) -> CheckedRequest:
        """The request checked against this model (PipelineError when it cannot be drawn), its images prepared."""
        if request.loras and [(str(p), float(s)) for p, s in request.loras] != [
                (lora["file"], float(lora["scale"])) for lora in self.source.get("lora", [])]:
            raise PipelineError("the request's LoRA files are not the ones applied: load them with with_lora first")
        return check_request(request, self.capabilities)

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

    def _chunks(self, plan: CheckedRequest, progress: bool,
                callback: Callable[[dict], None] | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of the chunk's first image, its images (B, 3, H, W) on the CPU) per chunk."""
        n, size, seed = len(plan.conditions), plan.request.batch_size, plan.request.seed
        with tqdm(total=math.ceil(n / size) * plan.steps_run, disable=not progress, unit="step",
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
