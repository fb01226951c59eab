"""Where config targets moved: a run's ``config.yaml`` (or an exported file's metadata) names classes by
their import path when it was written, so every path that has moved resolves through this table.

``MOVED_MODULES`` maps a module that no longer exists to its new home (its classes kept their names);
``MOVED_TARGETS`` maps single names that changed module or name. Both only grow: an entry is never
removed while runs that name it may exist.
"""

from __future__ import annotations

# The split of the flat package into layers (core / io / nets / diffusion / systems / inference / training).
MOVED_MODULES: dict[str, str] = {
    "ldm.config": "ldm.core.config",
    "ldm.errors": "ldm.core.errors",
    "ldm.images": "ldm.core.images",
    "ldm.metrics": "ldm.core.metrics",
    "ldm.checkpoints": "ldm.io.checkpoints",
    "ldm.safe_pickle": "ldm.io.safe_pickle",
    "ldm.runs": "ldm.io.runs",
    "ldm.conditioning.hf_clip": "ldm.io.hf_clip",
    "ldm.unet.model": "ldm.nets.unet.model",
    "ldm.unet.blocks": "ldm.nets.unet.blocks",
    "ldm.unet.attention": "ldm.nets.unet.attention",
    "ldm.unet.controlnet": "ldm.nets.controlnet",
    "ldm.autoencoder.nets": "ldm.nets.autoencoder.encoder_decoder",
    "ldm.autoencoder.distributions": "ldm.nets.autoencoder.distributions",
    "ldm.autoencoder.discriminator": "ldm.nets.autoencoder.discriminator",
    "ldm.autoencoder.losses": "ldm.nets.autoencoder.losses",
    "ldm.autoencoder.model": "ldm.systems.autoencoder",
    "ldm.conditioning.base": "ldm.nets.conditioning.base",
    "ldm.conditioning.embedders": "ldm.nets.conditioning.embedders",
    "ldm.conditioning.openclip": "ldm.nets.conditioning.openclip",
    "ldm.conditioning.openclip_weights": "ldm.nets.conditioning.openclip_weights",
    "ldm.conditioning.text": "ldm.nets.conditioning.text",
    "ldm.conditioning.tokens": "ldm.nets.conditioning.tokens",
    "ldm.ema": "ldm.nets.ema",
    "ldm.torch_compile": "ldm.nets.compile",
    "ldm.optim": "ldm.systems.optim",
    "ldm.systems.control_base": "ldm.training.controlnet_base",
    "ldm.sd": "ldm.inference.sd",
    "ldm.sd_control": "ldm.inference.sd_control",
    "ldm.sd_export": "ldm.inference.export",
    "ldm.pipeline": "ldm.inference.pipeline",
    "ldm.pipeline_load": "ldm.inference.loaders",
    "ldm.control_image": "ldm.inference.control_image",
    "ldm.png_params": "ldm.inference.png_params",
    "ldm.train": "ldm.training.driver",
    "ldm.callbacks": "ldm.training.callbacks",
    "ldm.guards": "ldm.training.guards",
    "ldm.data.cache_setup": "ldm.training.cache",
}

MOVED_TARGETS: dict[str, str] = {
    "ldm.autoencoder.model.AutoencoderKL": "ldm.systems.autoencoder.AutoencoderKLSystem",
    "ldm.systems.autoencoder.AutoencoderKL": "ldm.systems.autoencoder.AutoencoderKLSystem",
    "ldm.sd_control.ControlLDM": "ldm.systems.controlnet.ControlLDM",
    "ldm.inference.sd_control.ControlLDM": "ldm.systems.controlnet.ControlLDM",
    "ldm.diffusion.NoiseSchedule": "ldm.diffusion.schedule.VPSchedule",
    "ldm.diffusion.schedule.NoiseSchedule": "ldm.diffusion.schedule.VPSchedule",
}


def resolve_alias(target: str) -> str:
    """The current import path of ``target`` (itself when it has not moved)."""
    if target in MOVED_TARGETS:
        return MOVED_TARGETS[target]
    module, _, name = target.rpartition(".")
    if module in MOVED_MODULES:
        return f"{MOVED_MODULES[module]}.{name}"
    return target
