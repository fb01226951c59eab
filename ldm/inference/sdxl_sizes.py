"""A request's SDXL micro-conditioning: ``original_size``, ``crop_top_left``, ``target_size`` options → sizes.

Defaults as diffusers' and generative-models' samplers: original = target = the requested size, crop (0, 0).
A model whose conditioner takes no sizes (SD 1.x / 2.x, this project's runs) refuses them by name.
"""

from __future__ import annotations

from torch import nn

from ldm.inference.loaders import PipelineError
from ldm.nets.conditioning.sdxl import SIZE_FIELDS, SizeConditioning


def request_sizes(cond_stage: nn.Module, options: dict, height: int, width: int) -> SizeConditioning | None:
    """Take the size options out of ``options`` and return the request's sizes (None for a model without them)."""
    given = {name: options.pop(name) for name in SIZE_FIELDS if name in options}
    if not getattr(cond_stage, "takes_sizes", False):
        if given:
            raise PipelineError(f"this model takes no size conditioning ({', '.join(given)}): only SDXL models do")
        return None
    try:
        return SizeConditioning.for_size(height, width, **{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise PipelineError(f"size conditioning: {e}") from e
