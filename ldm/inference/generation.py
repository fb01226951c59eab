"""What a generation returns: images with their seeds and the parameters that redraw each one (PNG metadata).

``image_parameters`` is the one definition of an image's parameters (written by ``ldm.inference.png_params`` as
AUTOMATIC1111's ``parameters`` text and as JSON): the condition, negative prompt, seed, sampling settings, size,
where the weights came from, and the control, classifier, LoRA and editing settings when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.request import CheckedRequest
from ldm.inference.source_checks import lineage_of


@dataclass
class Generation:
    """One call's images with everything needed to reproduce them: image i is ``conditions[i]`` from ``seeds[i]``."""

    images: list[Image.Image]
    seeds: list[int]
    conditions: list
    negative: list | None
    settings: dict  # steps, guidance, sampler, guidance_rescale, height, width, sampler options
    parameters: list[dict] | None = None  # image i's PNG parameters (``image_parameters``)


def input_name(value) -> str | None:
    """How an input image is recorded: its path, or a placeholder for an image given in memory."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(input_name(v) for v in value)
    return f"<{type(value).__name__}>"


def image_parameters(plan: CheckedRequest, caps: ModelCapabilities, source: dict, dtype: str, condition,
                     seed: int, negative=None) -> dict:
    """Everything needed to redraw one image (``condition`` None: the request's settings alone)."""
    r = plan.request
    kind = "class" if caps.is_class_model else "prompt"
    negative = negative if negative is not None else (r.negative if not isinstance(r.negative, (list, tuple)) else None)
    params = {kind: condition, "negative_prompt": negative, "seed": seed, "steps": r.steps, "sampler": r.sampler,
              "scale": r.guidance, "guidance_rescale": r.guidance_rescale, "height": plan.height, "width": plan.width,
              "run": source.get("run"), "checkpoint": source.get("checkpoint"), "ema": source.get("ema"),
              "dtype": dtype}
    if kind == "class" and caps.class_names and condition is not None:
        params["class_name"] = caps.class_names[condition]
    params.update(plan.options)
    if plan.sizes is not None:  # SDXL's micro-conditioning
        params.update({k: list(v) for k, v in vars(plan.sizes).items()})
    if source.get("config") or source.get("controlnet"):
        params.update(config=source.get("config"), controlnet=source.get("controlnet"))
    if r.control is not None:
        params.update(control=input_name(r.control), control_scale=r.control_scale, guess_mode=r.guess_mode)
    if r.classifier_scale:
        params.update(classifier=source.get("classifier"), classifier_scale=r.classifier_scale)
    if source.get("lora"):
        params["lora"] = source["lora"]
    if r.init_image is not None:
        params.update(init_image=input_name(r.init_image), strength=r.strength, mask=input_name(r.mask))
    params["lineage"] = lineage_of(source.get("run"), source.get("checkpoint"), source)  # what drew it
    return params
