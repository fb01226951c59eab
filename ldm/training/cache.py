"""Build or check the latent cache that a stage-2 config's ``cache:`` section describes.

    cache:
      dir: cache/shapes-f4            # where the shards and meta.json live
      vae: runs/vae/latest            # the stage-1 run (or checkpoint) that encodes the images, or a public
      vae_config: null                # SD file whose VAE does, with its inference config here (a fine-tune)
      data: {train: <dataset node>, val: <dataset node>}
      batch_size: 64                  # encoding batch size
      shard_size: 4096                # items per shard
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm.core.config import ConfigError, check_config, instantiate_from_config
from ldm.data.latents import CacheError, build_cache, read_meta
from ldm.inference.loaders import load_autoencoder

log = logging.getLogger(__name__)
CACHE_DEFAULTS = {"batch_size": 64, "shard_size": 4096, "num_workers": 0, "vae_config": None}
CACHE_REQUIRED = ("dir", "vae", "data")


def cache_section(cfg: dict) -> dict:
    """The config's ``cache:`` section with defaults, checked for typos and missing keys."""
    section = cfg.get("cache")
    if not isinstance(section, dict):
        raise ConfigError("config has no `cache:` section (dir, vae, data) describing the latent cache")
    unknown = set(section) - set(CACHE_REQUIRED) - set(CACHE_DEFAULTS)
    if unknown:
        raise ConfigError(f"cache.{sorted(unknown)[0]}: unknown key; allowed: {', '.join(CACHE_REQUIRED + tuple(CACHE_DEFAULTS))}")
    missing = [k for k in CACHE_REQUIRED if k not in section]
    if missing:
        raise ConfigError(f"cache.{missing[0]}: required")
    if not isinstance(section["data"], dict) or not section["data"]:
        raise ConfigError("cache.data: expected a mapping of split name → dataset node, e.g. {train: …, val: …}")
    for split, node in section["data"].items():
        check_config(node, f"cache.data.{split}")
    return {**CACHE_DEFAULTS, **section}


def make_cache(cfg: dict, progress: bool = True) -> dict:
    """Encode the datasets of ``cfg['cache']`` with its VAE (resuming finished shards); returns meta."""
    section = cache_section(cfg)
    vae, info = load_autoencoder(section["vae"], section["vae_config"])
    datasets = {split: instantiate_from_config(node, f"cache.data.{split}") for split, node in section["data"].items()}
    return build_cache(vae, datasets, section["dir"], info, section["batch_size"], section["shard_size"],
                       section["num_workers"], progress)


def ensure_cache(cfg: dict, config_path: str | None = None, build_missing: bool = True) -> dict:
    """Check that the cache exists and was made with the config's VAE; build it first when missing."""
    section = cache_section(cfg)
    command = f"python stages/cache_latents.py --vae {section['vae']}" + (f" --cfg {config_path}" if config_path else "")
    try:
        meta = read_meta(section["dir"])
    except CacheError as e:
        if not build_missing:
            raise CacheError(f"{e}. Build it with: {command}") from e
        log.info("%s: building it now (the same as `%s`)", e, command)
        return make_cache(cfg)
    _, info = load_autoencoder(section["vae"], section["vae_config"])
    if meta["vae"]["hash"] != info["hash"]:
        raise CacheError(
            f"the latent cache {section['dir']} was made with VAE {meta['vae']['checkpoint']} (weights hash "
            f"{meta['vae']['hash']}), but this config uses {info['checkpoint']} (hash {info['hash']}). "
            f"Delete {Path(section['dir'])} and re-run: {command}, or set cache.dir to another folder."
        )
    return meta
