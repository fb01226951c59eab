"""Build or check the latent cache that a stage-2 config's ``cache:`` section describes.

    cache:
      dir: cache/shapes-f4            # where the shards and meta.json live
      vae: runs/vae/latest            # the stage-1 run (or checkpoint) that encodes the images, or a public
      vae_config: null                # SD file whose VAE does, with its inference config here (a fine-tune)
      data: {train: <dataset node>, val: <dataset node>}
      batch_size: 64                  # encoding batch size
      shard_size: 4096                # items per shard
      text_embeddings: false          # true: also cache the frozen text encoder's caption embeddings
                                      # (ldm.training.text_cache); stage 2 then never builds the encoder
      format: folder                  # or litdata: streamed shards at `uri` (ldm.training.streaming)
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from ldm.core.config import ConfigError, check_config, config_section, get_obj_from_str, instantiate_from_config
from ldm.data.cache_identity import built_from, cache_identity, what_changed
from ldm.data.latents import CacheError, build_cache, check_counts, read_meta
from ldm.inference.loaders import load_autoencoder
from ldm.nets.conditioning.embedders import ClassEmbedder
from ldm.training.bucket_steps import open_bucket_steps, resolve_bucket_steps
from ldm.training.streaming import check_format, check_streaming, is_streaming, make_streaming, probe, read_streamed
from ldm.training.text_cache import encoder_to_cache, ensure_text_cache

log = logging.getLogger(__name__)
CACHE_DEFAULTS = {"batch_size": 64, "shard_size": 4096, "num_workers": 0, "vae_config": None, "text_embeddings": False,
                  "format": "folder", "uri": None, "chunk_bytes": "64MB"}
CACHE_REQUIRED = ("dir", "vae", "data")
LoadVae = Callable[..., tuple]  # (spec, inference config or None) → (VAE, its identity), as load_autoencoder
# cache: keys that say where or how fast a cache is built, not what it holds (or that its identity covers otherwise)
HOW_NOT_WHAT = ("dir", "vae", "vae_config", "data", "batch_size", "num_workers", "shard_size", "text_embeddings", "format",
                "uri", "chunk_bytes")
IDENTITY_SEPARATOR, IDENTITY_SHOWN = "--", 8  # a cache rebuilt for changed sources: <dir>--<identity[:8]>


def cache_section(cfg: dict) -> dict:
    """The config's ``cache:`` section with defaults, checked for typos and missing keys."""
    section = config_section(cfg, "cache", CACHE_DEFAULTS, CACHE_REQUIRED, "describing the latent cache")
    if not isinstance(section["data"], dict) or not section["data"]:
        raise ConfigError("cache.data: expected a mapping of split name → dataset node, e.g. {train: …, val: …}")
    for split, node in section["data"].items():
        check_config(node, f"cache.data.{split}")
    check_format(section)
    return section


def make_cache(cfg: dict, progress: bool | None = None, load_vae: LoadVae = load_autoencoder) -> dict:
    """Encode the datasets of ``cfg['cache']`` with its VAE (resuming finished shards); returns meta. The bar
    shows in a terminal only (``progress=None``), so a log file gets lines. ``load_vae`` loads the VAE (the
    driver's loads it once for the cache and the system)."""
    section = cache_section(cfg)
    progress = sys.stderr.isatty() if progress is None else progress
    probe(section)
    vae, info = load_vae(section["vae"], section["vae_config"])
    resolve_bucket_steps(cfg, section["data"], info.get("downsampling_factor"))
    datasets = {split: instantiate_from_config(node, f"cache.data.{split}") for split, node in section["data"].items()}
    if is_streaming(section):
        meta = make_streaming(section, vae, info, datasets, encoder_to_cache(cfg))
    else:
        meta = build_cache(vae, datasets, section["dir"], info, section["batch_size"], section["shard_size"],
                           section["num_workers"], progress, data_config=section["data"],
                           settings=content_settings(section))
    meta = ensure_text_cache(cfg, meta, section["batch_size"], progress)
    for split, counts in meta["splits"].items():
        log.info("cache %s: %s %d items in %d shard(s)", section["dir"], split, counts["items"], counts["shards"])
    for split, counts in (meta.get("buckets") or {}).get("counts", {}).items():
        log.info("cache %s: %s per bucket (h×w): %s", section["dir"], split,
                 ", ".join(f"{size}={n}" for size, n in counts.items()))
    if meta.get("classes"):
        log.info("classes (name → label, stored in %s/meta.json): %s", section["dir"], _class_list(meta["classes"]))
    return meta


def _class_list(classes: dict[str, int], shown: int = 12) -> str:
    items = [f"{name}={label}" for name, label in sorted(classes.items(), key=lambda kv: kv[1])]
    return ", ".join(items[:shown]) + (f", … ({len(items)} in all)" if len(items) > shown else "")


def ensure_cache(cfg: dict, config_path: str | None = None, build_missing: bool = True,
                 load_vae: LoadVae = load_autoencoder) -> dict:
    """Check that the cache exists and was made with the config's VAE; build it first when missing."""
    section = cache_section(cfg)
    command = f"python stages/cache_latents.py --vae {section['vae']}" + (f" --cfg {config_path}" if config_path else "")
    probe(section)
    try:
        meta = read_meta(section["dir"])
    except CacheError as e:
        if not build_missing:
            raise CacheError(f"{e}. Build it with: {command}") from e
        log.info("%s: building it now (the same as `%s`)", e, command)
        return make_cache(cfg, load_vae=load_vae)
    info = load_vae(section["vae"], section["vae_config"])[1] if open_bucket_steps(section["data"]) else None
    if info is not None:  # buckets.step: null is filled in before comparing with what the cache was built from
        resolve_bucket_steps(cfg, section["data"], info.get("downsampling_factor"))
    built_from, wanted = meta.get("data"), json.loads(json.dumps(section["data"]))  # as meta.json stores it
    if built_from is not None and built_from != wanted:
        raise CacheError(
            f"the latent cache {section['dir']} was built from other data than this config's cache.data "
            f"({_difference(built_from, wanted, 'cache.data')}); delete "
            f"{Path(section['dir'])}, or set cache.dir to another folder"
        )
    if info is None:
        _, info = load_vae(section["vae"], section["vae_config"])
        resolve_bucket_steps(cfg, section["data"], info.get("downsampling_factor"))  # a given step: checked
    if meta["vae"]["hash"] != info["hash"]:
        raise CacheError(
            f"the latent cache {section['dir']} was made with VAE {meta['vae']['checkpoint']} (weights hash "
            f"{meta['vae']['hash']}), but this config uses {info['checkpoint']} (hash {info['hash']}). "
            f"Delete {Path(section['dir'])} and re-run: {command}, or set cache.dir to another folder."
        )
    if is_streaming(section):  # litdata shards: checked by their own index (the folder identity is the folder's)
        check_streaming(section, meta)
        return meta
    return check_sources(cfg, meta, info["hash"], build_missing)


def check_sources(cfg: dict, meta: dict, vae_hash: str, build_missing: bool = True) -> dict:
    """A cache is its content: when its sources changed since it was built (images added or edited, captions,
    labels, shard size), the cache for these sources is built (or found) in a folder of its own, ``<dir>--<identity>``,
    with a line saying why, and the config pointed at it; a finished cache's counts are checked against its shards."""
    identity = cache_for_sources(cfg, meta, vae_hash)
    if identity is None:
        check_counts(cfg["cache"]["dir"], meta)
        return meta
    try:
        meta = read_meta(cfg["cache"]["dir"])
    except CacheError:
        if not build_missing:
            raise
        return make_cache(cfg)
    if meta.get("identity") != identity:
        raise CacheError(f"{cfg['cache']['dir']} holds a cache of other sources too; delete it")
    check_counts(cfg["cache"]["dir"], meta)
    return meta


def cache_for_sources(cfg: dict, meta: dict, vae_hash: str) -> str | None:
    """None when the cache at ``cache.dir`` (``meta``) was built from these sources; else the identity of these
    sources, with ``cfg`` pointed at their own folder ``<dir>--<identity[:8]>`` and a line saying why."""
    section = cache_section(cfg)
    datasets = {split: instantiate_from_config(node, f"cache.data.{split}") for split, node in section["data"].items()}
    spec = built_from(vae_hash, datasets, section["data"], section["shard_size"], content_settings(section))
    identity = cache_identity(spec)
    if meta.get("identity") == identity or meta.get("identity") is None and meta.get("built_from") is None \
            and not any(s["sources"] for s in spec["splits"].values()):
        return None  # (a generated dataset's legacy cache: its nodes are checked against cache.data)
    old_dir = section["dir"]
    new_dir = f"{Path(old_dir).name.split(IDENTITY_SEPARATOR)[0]}{IDENTITY_SEPARATOR}{identity[:IDENTITY_SHOWN]}"
    set_cache_dir(cfg, str(Path(old_dir).parent / new_dir))
    log.info("the latent cache %s was built from other sources (%s): using %s for these", old_dir,
             what_changed(meta.get("built_from"), spec), cfg["cache"]["dir"])
    return identity


def content_settings(section: dict) -> dict:
    """The ``cache:`` settings that change what a cache holds beyond its VAE, data and shard size (none today;
    e.g. buckets): part of its identity."""
    return {k: v for k, v in section.items() if k not in HOW_NOT_WHAT}


def set_cache_dir(cfg: dict, new: str) -> None:
    """Point ``cache.dir`` and the latent datasets that named the old folder (``${cache.dir}``) at ``new``."""
    old = cfg["cache"]["dir"]
    cfg["cache"]["dir"] = new
    for node in ((cfg.get("data") or {}).get("params") or {}).values():
        params = node.get("params") if isinstance(node, dict) else None
        if isinstance(params, dict) and params.get("cache_dir") == old:
            params["cache_dir"] = new


def _difference(cached: object, wanted: object, path: str) -> str:
    """The first setting where two configs differ: ``path: X in the cache, Y in the config``."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        for key in list(dict.fromkeys([*cached, *wanted])):
            if cached.get(key) != wanted.get(key):
                return _difference(cached.get(key), wanted.get(key), f"{path}.{key}")
    return f"{path}: {cached!r} in the cache, {wanted!r} in the config"


def class_embedder_params(cfg: dict) -> dict | None:
    """The ``params`` of a stage-2 config's class embedder (None when it is conditioned on something else)."""
    cond = ((cfg.get("model") or {}).get("params") or {}).get("cond_stage")
    if not isinstance(cond, dict) or "target" not in cond:
        return None
    try:
        cls = get_obj_from_str(cond["target"], "model.params.cond_stage")
    except ConfigError:
        return None
    return cond.setdefault("params", {}) if isinstance(cls, type) and issubclass(cls, ClassEmbedder) else None


def sync_classes(cfg: dict, meta: dict) -> dict:
    """Check ``n_classes`` against the cache's class folders and store their names in the config (the run keeps
    them; ``cfg`` is returned): an error naming both numbers when they differ."""
    params = class_embedder_params(cfg)
    classes = meta.get("classes") or {}
    if params is None or not classes:
        return cfg
    n = params.get("n_classes")
    if n != len(classes):
        raise ConfigError(
            f"model.params.cond_stage.params.n_classes is {n}, but the data has {len(classes)} classes (the "
            f"sub-folders listed in {cfg['cache']['dir']}/meta.json); set model.params.cond_stage.params.n_classes="
            f"{len(classes)}, or train with --data FOLDER, which fills it in"
        )
    params["class_names"] = [name for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    return cfg


def prepare_stage2(cfg: dict, config_path: str | None = None, load_vae: LoadVae = load_autoencoder) -> dict:
    """Stage 2's preparation of a resolved config: the latent cache (built when missing; its text embeddings when
    configured), its classes checked against the config's (the config itself is not changed)."""
    meta = ensure_text_cache(cfg, ensure_cache(cfg, config_path, load_vae=load_vae))
    sync_classes(copy.deepcopy(cfg), meta)
    return meta
