"""Stage 2 from a public Stable Diffusion file: complete the config from the base, then start from its weights.

    model:
      target: ldm.systems.latent_diffusion.LatentDiffusion
      params:
        base_ckpt: v1-5-pruned-emaonly.safetensors   # the SD file the fine-tune starts from …
        base_config: configs/sd/v1-inference.yaml    # … and its inference config (the architecture)
    cache:
      vae: ${model.params.base_ckpt}                 # the latent cache is encoded by the base's own VAE
      vae_config: ${model.params.base_config}

``complete_from_base`` (stage 2's ``complete``) fills in what the fine-tune takes from its base (``INHERITED``: U-Net,
text encoder, VAE, objective, scale factor, image size, whether the text encoder trains) under what the config sets
itself (e.g. ``unet.params.use_checkpoint`` or the objective's ``min_snr_gamma``), so the run's saved config
builds the model alone (each text encoder frozen unless it trains: ``cond_stage_trainable``, or LoRA ``text_targets``;
SDXL's two towers each by its embedder's ``freeze``), and checks that the cache is the base's VAE's.
``start_from_base`` (its ``init_weights``) loads the file into a new run's system.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ldm.core.config import ConfigError
from ldm.core.paths import config_path
from ldm.inference.sd import read_model_config
from ldm.inference.sd_base import prepare_weights
from ldm.io.checkpoints import CheckpointError

log = logging.getLogger(__name__)

# What a fine-tune takes from its base's inference config, under its own settings.
INHERITED = ("unet", "cond_stage", "first_stage", "objective", "scale_factor", "image_size", "cond_stage_trainable")
FROZEN_TEXT_PARAM = "freeze"  # FrozenOpenCLIP's switch: a frozen encoder runs without gradients


def merged(base: Any, own: Any) -> Any:
    """``own`` laid over ``base``: mappings merge key by key (a node naming another target replaces the base's)."""
    if not isinstance(base, dict) or not isinstance(own, dict):
        return copy.deepcopy(base if own is None else own)
    if own.get("target") not in (None, base.get("target")):
        return copy.deepcopy(own)
    out = copy.deepcopy(base)
    for key, value in own.items():
        out[key] = merged(base.get(key), value)
    return out


def _base_paths(params: dict) -> tuple[Path, Path]:
    """(base file, its inference config), both checked to exist."""
    ckpt, config = params.get("base_ckpt"), params.get("base_config")
    if not config:
        raise ConfigError("model.params.base_config: required with base_ckpt: the SD file's inference config "
                          "(configs/sd/v1-inference.yaml for SD 1.x, v2-inference-v.yaml for 2.x at 768 px, or the "
                          ".yaml scripts/export.py wrote beside a file)")
    if not Path(ckpt).is_file():
        raise CheckpointError(f"model.params.base_ckpt: {ckpt} not found (a public SD file, e.g. "
                              "v1-5-pruned-emaonly.safetensors)")
    config = config_path(config)  # configs/sd/… also from an installed package
    if not config.is_file():
        raise ConfigError(f"model.params.base_config: {config} not found (the SD inference configs are in configs/sd/)")
    return Path(ckpt).resolve(), config.resolve()


def _check_cache(cfg: dict, ckpt: Path, config: Path) -> None:
    """The latent cache must be encoded by the base's VAE: ``cache.vae`` is the base file, ``vae_config`` its config."""
    cache = cfg.get("cache")
    if not isinstance(cache, dict):
        return  # no cache section: the stage's cache check names what is missing
    for key, want in (("vae", ckpt), ("vae_config", config)):
        given = cache.get(key)
        if given is None or config_path(given).resolve() != want:
            raise ConfigError(f"cache.{key}: a fine-tune's latents are encoded by its base's VAE, so cache.{key} must "
                              f"be {want} (model.params.base_{'ckpt' if key == 'vae' else 'config'}), got {given}")
        cache[key] = str(want)


def complete_from_base(cfg: dict) -> dict:
    """Stage 2's completion: with ``model.params.base_ckpt`` set, fill the model in from the base (in ``cfg``, which
    is returned; the stage's plan calls it on its own copy)."""
    params = (cfg.get("model") or {}).get("params") or {}
    if not params.get("base_ckpt"):
        return cfg
    ckpt, config = _base_paths(params)
    params["base_ckpt"], params["base_config"] = str(ckpt), str(config)  # pinned: a resumed run may start elsewhere
    base = read_model_config(config)["params"]
    for key in INHERITED:
        if key in base or params.get(key) is not None:
            params[key] = merged(base.get(key), params.get(key))
    lora_text = ((params.get("lora") or {}).get("params") or {}).get("text_targets")
    frozen = not (params.get("cond_stage_trainable", False) or bool(lora_text))
    for text in text_encoder_nodes(params.get("cond_stage") or {}):  # a frozen encoder computes no gradients, even
        text["params"][FROZEN_TEXT_PARAM] = frozen                    # for adapters
    _check_cache(cfg, ckpt, config)
    return cfg


def text_encoder_nodes(cond_stage: dict) -> list[dict]:
    """The config nodes of the text encoders that have a ``freeze`` switch: the conditioning stage itself (SD), or each
    of its ``embedders`` (SDXL's conditioner: ``cond_stage.params.embedders[i]``)."""
    params = cond_stage.get("params") or {}
    nodes = [cond_stage, *(e for e in params.get("embedders") or [] if isinstance(e, dict))]
    return [node for node in nodes if FROZEN_TEXT_PARAM in (node.get("params") or {})]


def start_from_base(system: nn.Module, cfg: dict | None = None) -> dict:
    """Stage 2's ``init_weights``: a new run starts from its base file's weights (then a LoRA run adds its adapters)."""
    info = prepare_weights(system)
    if info:
        log.info("starting from %s (%s weights in the U-Net)", info["checkpoint"], "EMA" if info["ema"] else "raw")
    return info


def resume_from_base(system: nn.Module, cfg: dict | None = None) -> dict:
    """Stage 2's ``resume_weights``: a resumed LoRA run's base and adapters (its checkpoints hold only the adapters)."""
    return prepare_weights(system, resumed=True)
