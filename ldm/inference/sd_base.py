"""A fine-tune's base: a public Stable Diffusion file loaded into a stage-2 system (``model.params.base_ckpt``).

``load_base`` gives a LatentDiffusion built from the base's inference config the file's weights, strictly: the U-Net
takes the file's EMA weights when it has them (``model_ema.*``), the text encoder (SD1's Hugging Face names mapped to
open_clip's) and the VAE take theirs, and the scale factor stays the base's (the config's 0.18215, or the one the file
stores): it is never re-measured on the new data, since the U-Net was trained at that scale. A system that keeps an
EMA starts it from the loaded U-Net.
"""

from __future__ import annotations

from torch import nn

from ldm.core.config import ConfigError
from ldm.inference.sd import load_sd_weights, read_sd_state


def base_hint(config: str | None) -> str:
    """What to check when a base file does not fit the model its config builds."""
    return (f"Is model.params.base_config ({config}) the file's inference config? SD 1.x: configs/sd/v1-inference.yaml; "
            "SD 2.x: v2-inference.yaml (512 px, ε) or v2-inference-v.yaml (768 px, v); a file scripts/export.py wrote: "
            "the .yaml beside it")


def load_base(system: nn.Module, use_ema: bool = True) -> dict:
    """Load the public SD file a system names as its base (``base_source``) into it, strictly; returns what was done."""
    source = getattr(system, "base_source", None) or {}
    ckpt, config = source.get("base_ckpt"), source.get("base_config")
    if not ckpt:
        raise ConfigError("the model has no base to start from: set model.params.base_ckpt (a public SD file) and "
                          "model.params.base_config (its inference config)")
    info = load_sd_weights(system, read_sd_state(ckpt), use_ema=use_ema, what=f"the base {ckpt}",
                           hint=base_hint(config), consume=True)
    return {"checkpoint": str(ckpt), **info}
