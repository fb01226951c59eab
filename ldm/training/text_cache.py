"""Stage 2 on cached text embeddings (``cache.text_embeddings: true``): the frozen text encoder of
``model.params.cond_stage`` encodes every caption once into the latent cache, and training builds the system with a
stand-in in its place (``CachedTextEncoder``; for SDXL's conditioner, whose pooled output is cached too,
``CachedSDXLConditioner``), so the encoder is never built for training steps.

    cache:
      text_embeddings: true   # needs model.params.cond_stage_trainable: false (a frozen encoder)

The encoder is identified by the hash of its weights: a fine-tune's (``model.params.base_ckpt``) as loaded from its base
file (``ldm.inference.base_text``), else random weights drawn from the config's ``seed`` (so a toy encoder is the same
one each time); a cache made with another encoder (another base) is refused.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

from ldm.core.config import ConfigError, instantiate_from_config
from ldm.data.latents import read_meta
from ldm.data.text_cache import build_text_cache, check_encoder, load_text_files, text_complete
from ldm.inference.base_text import base_text_hash, load_base_text_encoder
from ldm.inference.loaders import build_system, load_autoencoder
from ldm.io.checkpoints import tensors_hash
from ldm.data.text_shards import CONTEXT_KEY, POOLED_KEY, TEXT_FIELD
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.nets.conditioning.cached_sdxl import CachedSDXLConditioner

log = logging.getLogger(__name__)
ENCODER_PATH = "model.params.cond_stage"
SDXL_SETTINGS = ("size_embed_dim", "zero_unconditional")  # what the SDXL stand-in takes from its conditioner's node


def text_cache_on(cfg: dict) -> bool:
    """Whether the config trains on cached text embeddings."""
    return bool((cfg.get("cache") or {}).get("text_embeddings"))


def _encoder_node(cfg: dict) -> dict:
    params = (cfg.get("model") or {}).get("params") or {}
    if params.get("cond_stage_trainable", True):
        raise ConfigError("cache.text_embeddings: the text encoder must be frozen to cache its embeddings; set "
                          "model.params.cond_stage_trainable: false (or cache.text_embeddings: false)")
    if ((params.get("lora") or {}).get("params") or {}).get("text_targets"):
        raise ConfigError("cache.text_embeddings: LoRA adapters on the text encoder (model.params.lora.params."
                          "text_targets) change its embeddings while training; drop text_targets or set "
                          "cache.text_embeddings: false")
    if not isinstance(params.get("cond_stage"), dict):
        raise ConfigError(f"{ENCODER_PATH}: cache.text_embeddings needs the text encoder's config node (a fine-tune's "
                          "comes from its base: complete the config with ldm.training.sd_finetune.complete_from_base)")
    return params["cond_stage"]


def text_encoder_identity(cfg: dict) -> dict:
    """The identity of the config's frozen encoder, ``{"hash", "encoder"[, "base"]}``, without building it for a
    fine-tune (the hash of the base's text weights, read tensor by tensor)."""
    node = _encoder_node(cfg)
    params = cfg["model"]["params"]
    if params.get("base_ckpt"):
        return {"hash": base_text_hash(params["base_ckpt"], params["base_config"]), "encoder": node,
                "base": str(params["base_ckpt"])}
    return build_text_encoder(cfg)[1]


def build_text_encoder(cfg: dict) -> tuple[nn.Module, dict]:
    """The frozen encoder of ``model.params.cond_stage`` and its identity ``{"hash", "encoder"[, "base"]}``: with
    ``model.params.base_ckpt`` the base file's weights, else random weights drawn from the config's seed."""
    node = _encoder_node(cfg)
    params = cfg["model"]["params"]
    if params.get("base_ckpt"):
        encoder = load_base_text_encoder(node, params["base_ckpt"], params["base_config"], ENCODER_PATH)
        return encoder, {"hash": tensors_hash(encoder.state_dict()), "encoder": node, "base": str(params["base_ckpt"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.get("seed", 0))
        encoder = instantiate_from_config(node, ENCODER_PATH)
    return encoder.eval().requires_grad_(False), {"hash": tensors_hash(encoder.state_dict()), "encoder": node}


def encoder_to_cache(cfg: dict) -> tuple[nn.Module, dict] | None:
    """With ``cache.text_embeddings``, the frozen encoder and its identity for a build that encodes the captions with
    the images (a litdata cache's items hold both); else None."""
    return build_text_encoder(cfg) if text_cache_on(cfg) else None


def ensure_text_cache(cfg: dict, meta: dict, batch_size: int = 64, progress: bool = False) -> dict:
    """With ``cache.text_embeddings``: check the cache's text embeddings against the config's encoder, or encode the
    captions now (resuming finished shards); returns the cache's meta. The encoder is built only to encode."""
    if not text_cache_on(cfg):
        return meta
    cache_dir = cfg["cache"]["dir"]
    check_encoder(meta, text_encoder_identity(cfg), cache_dir)
    if text_complete(meta):
        return meta
    encoder, info = build_text_encoder(cfg)
    log.info("cache %s: encoding the captions with %s (hash %s)", cache_dir, info["encoder"]["target"], info["hash"])
    build_text_cache(encoder, cache_dir, info, batch_size, progress)
    return read_meta(cache_dir)


def build_stage2_system(cfg: dict, load_vae: Callable[..., tuple] = load_autoencoder) -> nn.Module:
    """The stage-2 system; with cached text embeddings, a stand-in for the text encoder (``cached_text_stage``)."""
    if not text_cache_on(cfg):
        return build_system(cfg["model"], load_vae=load_vae)
    node = cfg["model"]
    params = dict(node.get("params") or {})
    extra = {"cond_stage": cached_text_stage(params.pop("cond_stage"), cfg["cache"]["dir"])}
    if isinstance(params.get("first_stage"), (str, os.PathLike)):  # a VAE run: loaded as build_system does
        extra["first_stage"] = load_vae(params.pop("first_stage"), None)[0]
    return instantiate_from_config({**node, "params": params}, "model", **extra)


def cached_text_stage(encoder_node: dict, cache_dir: str) -> nn.Module:
    """The stand-in for the encoder of ``encoder_node`` over the cache's text files: a ``CachedTextEncoder`` (context
    from ``batch["context"]``), or for a conditioner with a pooled output (SDXL's) a ``CachedSDXLConditioner``
    (``batch["text"]``: context and pooled; ``y`` from them and the sizes)."""
    weights, uncond = load_text_files(cache_dir)
    encoder_params = encoder_node.get("params") or {}

    def build_encoder() -> nn.Module:
        return instantiate_from_config(encoder_node, ENCODER_PATH)

    if POOLED_KEY not in uncond:
        return CachedTextEncoder(weights, uncond[CONTEXT_KEY], build_encoder, key=encoder_params.get("key", "caption"))
    settings = {k: encoder_params[k] for k in SDXL_SETTINGS if k in encoder_params}
    return CachedSDXLConditioner(weights, uncond, build_encoder, key=TEXT_FIELD, **settings)
