"""The step every bucket side must be a multiple of, for a stage-2 config: the VAE's factor × the U-Net's total
downsampling. ``buckets.step: null`` in a cache's dataset node is filled in with it; a given step must be a multiple
of it."""

from __future__ import annotations

from ldm.core.config import ConfigError

UNET_DEFAULT_LEVELS = 4  # UNetModel's default channel_mult (1, 2, 4, 8)


def unet_downsampling(cfg: dict) -> int | None:
    """2^(levels − 1) of the config's U-Net (``model.params.unet``); None when the config does not build one."""
    unet = ((cfg.get("model") or {}).get("params") or {}).get("unet")
    if not isinstance(unet, dict) or "target" not in unet:
        return None
    levels = len((unet.get("params") or {}).get("channel_mult") or [None] * UNET_DEFAULT_LEVELS)
    return 2 ** (levels - 1)


def required_step(cfg: dict, vae_factor: int | None) -> int | None:
    """VAE factor × U-Net downsampling (None when either is unknown)."""
    downsampling = unet_downsampling(cfg)
    return vae_factor * downsampling if vae_factor and downsampling else None


def open_bucket_steps(data: dict) -> bool:
    """Whether a dataset node in ``data`` (split → node) leaves its ``buckets.step`` to be filled in."""
    return any(isinstance(b := (node.get("params") or {}).get("buckets"), dict) and b.get("step") is None
               for node in data.values() if isinstance(node, dict))


def resolve_bucket_steps(cfg: dict, data: dict, vae_factor: int | None) -> None:
    """Fill ``buckets.step: null`` of every dataset node in ``data`` (split → node) and check given steps."""
    step = required_step(cfg, vae_factor)
    for split, node in data.items():
        buckets = (node.get("params") or {}).get("buckets")
        if not isinstance(buckets, dict):
            continue
        where = f"cache.data.{split}.params.buckets.step"
        if buckets.get("step") is None:
            if step is None:
                raise ConfigError(f"{where}: give the step (the VAE factor × the U-Net's downsampling); this config "
                                  "does not tell both")
            buckets["step"] = step
        elif step is not None and int(buckets["step"]) % step:
            raise ConfigError(f"{where}: {buckets['step']} is not a multiple of {step} (the VAE factor {vae_factor} × "
                              f"the U-Net's downsampling {step // vae_factor}); use {step} or a multiple")
