"""Generated images on disk: safe, indexed file names and the generation parameters in PNG text chunks.

Each PNG carries ``parameters`` in AUTOMATIC1111's PNG-info style (prompt, negative prompt, then
``Key: value, …``) and ``ldm``, the same parameters as JSON, so an image says how to draw it again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

SLUG_CHARS = 48  # how much of a prompt goes into a file name
INDEX_DIGITS = 5
INDEXED_NAME = re.compile(rf"^(\d{{{INDEX_DIGITS}}})-")
PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's PNG text key
JSON_KEY = "ldm"
NEEDS_QUOTES = re.compile(r"[,:\n]")  # an A1111 field value with these is written as a JSON string


def slug(condition) -> str:
    """A file-name-safe piece of a prompt (ASCII letters, digits and dashes only) or ``class<k>``."""
    if not isinstance(condition, str):
        return f"class{int(condition)}"
    return re.sub(r"[^a-z0-9]+", "-", condition.lower()).strip("-")[:SLUG_CHARS].strip("-") or "prompt"


def next_index(out: Path) -> int:
    """The first free image index in ``out`` (runs add to a folder, never overwrite)."""
    indices = [int(m.group(1)) for p in out.glob("*.png") if (m := INDEXED_NAME.match(p.name))]
    return max(indices, default=-1) + 1


def _field(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if NEEDS_QUOTES.search(text) else text


def a1111_text(params: dict) -> str:
    """The parameters in AUTOMATIC1111's PNG-info style: prompt, negative prompt, then `Key: value, …`."""
    first = params.get("prompt", f"class {params.get('class')}")
    lines = [first] + ([f"Negative prompt: {params['negative_prompt']}"] if params.get("negative_prompt") else [])
    model = params.get("run") or params.get("checkpoint")
    fields = {"Steps": params["steps"], "Sampler": params["sampler"], "CFG scale": params["scale"],
              "Seed": params["seed"], "Size": f"{params['width']}x{params['height']}",
              "Model": Path(model).name if params.get("run") else Path(model).stem if model else None}
    if params.get("guidance_rescale"):
        fields["CFG rescale"] = params["guidance_rescale"]
    if "eta" in params:
        fields["Eta"] = params["eta"]
    if params.get("control"):
        fields.update({"ControlNet": Path(params["controlnet"]).stem if params.get("controlnet") else None,
                       "Control image": params["control"], "Control scale": params["control_scale"],
                       "Guess mode": params["guess_mode"]})
    if params.get("init_image"):
        fields.update({"Init image": params["init_image"], "Denoising strength": params["strength"],
                       "Mask": params.get("mask")})
    if params.get("lora"):
        fields["Lora"] = ", ".join(f"{Path(lora['file']).stem}:{lora['scale']}" for lora in params["lora"])
    fields["Checkpoint"] = params.get("checkpoint")
    fields["VAE hash"] = (params.get("lineage") or {}).get("vae")  # AUTOMATIC1111's name for it
    lines.append(", ".join(f"{k}: {_field(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def png_info(params: dict) -> PngInfo:
    """PNG text chunks: AUTOMATIC1111's `parameters` and the same as JSON."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(params, ensure_ascii=False))
    return info
