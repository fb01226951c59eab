"""Each stage's resolver: a loaded config → the completed config (what it inherits from a base or source run, the
class names of its data) and the lines that explain it (runs and files it reads, what it derives, what runs before
the model is built and what that writes). Resolvers read, never write; ``ldm.training.plan`` calls them once, on
the plan's own copy of the config.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ldm.core.config import instantiate_from_config
from ldm.data.latents import CacheError, class_map, read_meta
from ldm.data.text_cache import text_complete
from ldm.inference.loaders import sd_vae_node, vae_node
from ldm.io.lineage import pin_paths, vae_hash_of
from ldm.io.runs import checkpoint_for, run_config
from ldm.nets.autoencoder.model import downsampling_factor
from ldm.training.bucket_steps import open_bucket_steps, resolve_bucket_steps
from ldm.training.cache import cache_for_sources, cache_section, class_embedder_params, sync_classes
from ldm.training.controlnet_base import INHERITED as CONTROL_INHERITED
from ldm.training.controlnet_base import cache_on_base_vae, complete_model_node
from ldm.training.plan import Resolution
from ldm.training.reflow import complete_reflow, reflow_section
from ldm.training.sd_finetune import complete_from_base
from ldm.training.streaming import is_streaming, read_streamed
from ldm.training.text_cache import text_cache_on

Lines = tuple[tuple[str, str], ...]


def _read_meta(cache_dir: str) -> dict | None:
    """A complete cache's ``meta.json``, or None when the cache is missing or unfinished."""
    try:
        return read_meta(cache_dir)
    except CacheError:
        return None


def dataset_sizes(nodes: dict, where: str) -> dict[str, int]:
    """Items per split of dataset nodes (building a dataset lists its files; nothing is decoded)."""
    return {split: len(instantiate_from_config(node, f"{where}.{split}")) for split, node in nodes.items()}


def _sizes_text(sizes: dict[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in sizes.items())


def vae_source(spec: str, config: str | None) -> str:
    """Where a VAE's weights come from: a stage-1 run's checkpoint, or a public SD file with its inference config."""
    return f"{spec} (SD file; its VAE as {config} describes it)" if config else str(checkpoint_for(spec))


def cache_vae_factor(section: dict) -> int:
    """The downsampling factor of the cache's VAE, from its config (nothing is built or read but the config)."""
    node = sd_vae_node(section["vae_config"]) if section["vae_config"] else vae_node(section["vae"])
    return downsampling_factor((node.get("params") or {}).get("ddconfig") or {})


def cache_vae_hash(section: dict) -> str:
    """The weights hash of the cache's VAE (as ``meta.json`` records it), read from its file without building it."""
    if section["vae_config"]:
        return vae_hash_of(section["vae"], public=True)
    return vae_hash_of(checkpoint_for(section["vae"]))


def resolve_cache(cfg: dict, own_folder: bool = True) -> Resolution:
    """The latent cache a config trains on: the VAE, whether the cache exists (its size and scale factor) or will be
    encoded first, and the class names of its data (stored in the config). A cache built from other sources sends
    these to a folder of their own (``own_folder``; without it, as for ``cache_latents.py --out``, it is refused
    when it is encoded)."""
    section = cache_section(cfg)
    if open_bucket_steps(section["data"]):  # buckets.step: null → the VAE factor × the U-Net's downsampling
        resolve_bucket_steps(cfg, section["data"], cache_vae_factor(section))
    meta = _read_meta(section["dir"])
    if own_folder and not is_streaming(section) and meta is not None and cache_for_sources(cfg, meta, cache_vae_hash(section)) is not None:
        section, meta = cache_section(cfg), _read_meta(cfg["cache"]["dir"])  # these sources' own folder (built or not)
    depends = (("VAE (cache.vae)", vae_source(section["vae"], section["vae_config"])),)
    if meta is not None:
        splits = {split: counts["items"] for split, counts in (meta.get("splits") or {}).items()}
        derived = (("latent cache", f"{section['dir']}: {_sizes_text(splits)} items, latent {meta['latent_shape']}"),
                   ("scale_factor", f"{meta['scale_factor']:.5f} (1/std of the cached latents)"))
        prepare = (f"check the latent cache {section['dir']} against the VAE's weights hash and cache.data",)
        writes, classes = (), meta.get("classes") or {}
    else:
        datasets = {split: instantiate_from_config(node, f"cache.data.{split}") for split, node in section["data"].items()}
        splits = {split: len(ds) for split, ds in datasets.items()}
        derived = (("latent cache", f"{section['dir']}: missing; {_sizes_text(splits)} images to encode"),
                   ("scale_factor", "measured when the cache is built (1/std of the training latents)"))
        prepare = (f"encode the images into the latent cache {section['dir']} with the VAE (batch "
                   f"{section['batch_size']}, {section['shard_size']} items per shard)",)
        writes, classes = (f"{Path(section['dir']).absolute()}/ (latent shards, meta.json)",), class_map(datasets)
    if splits.get("train"):
        derived += (("training items", str(splits["train"])),)
    sync_classes(cfg, {"classes": classes})
    params = class_embedder_params(cfg)
    if params is not None:
        names = params.get("class_names")
        derived += (("n_classes", f"{params.get('n_classes')}" + (f" (class names from the data: {names[:8]}"
                                                                    f"{' …' if len(names) > 8 else ''})" if names else "")),)
    return Resolution(cfg, depends, derived, prepare, writes, splits.get("train"))


def given_scale(cache: Resolution, value: object, source: str) -> Resolution:
    """``cache`` with its scale-factor line naming the scale the model is given instead of the cache's measured one."""
    line = ("scale_factor", f"{value} ({source}; the cache's measured one is not used)")
    return replace(cache, derived=tuple(line if what == "scale_factor" else (what, text) for what, text in cache.derived))


def _merge(*parts: Resolution, config: dict) -> Resolution:
    items = [p.train_items for p in parts if p.train_items is not None]
    return Resolution(config, sum((p.depends for p in parts), ()), sum((p.derived for p in parts), ()),
                      sum((p.prepare for p in parts), ()), sum((p.writes for p in parts), ()), items[0] if items else None)


def resolve_images(cfg: dict, config_path: str) -> Resolution:
    """Stage 1: the datasets' sizes (the VAE trains on images decoded per batch)."""
    params = (cfg.get("data") or {}).get("params") or {}
    nodes = {split: params[split] for split in ("train", "val") if isinstance(params.get(split), dict)}
    sizes = dataset_sizes(nodes, "data.params")
    derived = (("images", _sizes_text(sizes)),) + ((("training items", str(sizes["train"])),) if "train" in sizes else ())
    return Resolution(cfg, derived=derived, train_items=sizes.get("train"))


def resolve_stage2(cfg: dict, config_path: str) -> Resolution:
    """Stage 2 (and the classifier): a fine-tune completed from its SD file, then the latent cache."""
    cfg = complete_from_base(cfg)
    params = cfg["model"].get("params") or {}
    depends: Lines = ()
    if params.get("base_ckpt"):
        depends = (("base (model.params.base_ckpt)", f"{params['base_ckpt']} with {params['base_config']}"),)
    first_stage = params.get("first_stage")
    cache = resolve_cache(cfg)
    if params.get("scale_factor"):  # given (a fine-tune's base): the cache's measured one is not used
        cache = given_scale(cache, params["scale_factor"], "the base's" if params.get("base_ckpt") else "set")
    if is_streaming(cache_section(cfg)):
        read_streamed(cfg)  # stage 2 reads the litdata shards (its dataset nodes retargeted)
    if isinstance(first_stage, str) and first_stage != (cfg.get("cache") or {}).get("vae"):
        depends += (("VAE (model.params.first_stage)", vae_source(first_stage, None)),)
    return _merge(Resolution(cfg, depends), cache, _text_cache(cfg), config=cfg)


def _text_cache(cfg: dict) -> Resolution:
    """With ``cache.text_embeddings``: the captions encoded once into the cache (when not already), and training on a
    stand-in for the frozen text encoder."""
    if not text_cache_on(cfg):
        return Resolution(cfg)
    meta = _read_meta(cache_section(cfg)["dir"])
    done = meta is not None and text_complete(meta)
    encoder = cfg["model"]["params"]["cond_stage"]["target"]
    return Resolution(cfg, derived=(("text conditioning", f"cached embeddings of {encoder} (not built for training "
                                                          "steps)"),),
                      prepare=(("check the cached caption embeddings against the frozen text encoder" if done else
                                "encode every caption once with the frozen text encoder into the latent cache"),))


def resolve_controlnet(cfg: dict, config_path: str) -> Resolution:
    """Stage 3: the model completed from its base (run pinned, U-Net / text encoder / schedule / VAE taken), then
    the hint-carrying cache."""
    complete_model_node(cfg["model"])
    params = cfg["model"]["params"]
    if params.get("base"):
        depends = (("base (model.params.base)", str(checkpoint_for(params["base"]))),)
    elif params.get("base_ckpt"):
        depends = (("base (model.params.base_ckpt)", f"{params['base_ckpt']} with {params['base_config']}"),)
    else:
        depends = ()
    pin_paths(cfg)  # what the base's config named by a link (a run from before runs pinned theirs), pinned too
    if "cache" in cfg:
        cache_on_base_vae(cfg)  # the cache is encoded by the VAE the base holds, whatever cache.vae's link says now
    taken = [key for key in CONTROL_INHERITED if params.get(key) is not None]
    derived = (("from the base", ", ".join(taken)),) if depends else ()
    parts = [Resolution(cfg, depends, derived)]
    if "cache" in cfg:
        parts.append(Resolution(cfg, prepare=("check that cache.vae is the base's VAE (weights hash)",)))
        scale = params.get("scale_factor")  # else the base checkpoint's buffer: the scale its U-Net learnt on
        parts.append(given_scale(resolve_cache(cfg), *((scale, "the base's") if scale else
                                                       ("the base's", "read from its checkpoint"))))
        parts.append(Resolution(cfg, prepare=("check that the latent cache carries hints (edge maps)",)))
    return _merge(*parts, config=cfg)


def resolve_reflow(cfg: dict, config_path: str) -> Resolution:
    """Reflow: the model taken from the source run, the source's own latent cache, the pairs drawn or checked."""
    cfg = complete_reflow(cfg)
    section = reflow_section(cfg)
    source = section["source"]
    source_cache = (run_config(source).get("cache") or {}).get("dir")
    depends = (("source run (reflow.source)", str(checkpoint_for(source))),
               ("conditions", f"the source's latent cache {source_cache}"))
    meta = _read_meta(section["dir"])
    if meta is not None:
        derived = (("pairs", f"{section['dir']}: {meta.get('count')} pairs drawn with {meta.get('sampler')} "
                             f"{meta.get('steps')} steps, guidance {meta.get('guidance')}"),)
        prepare = (f"check that the pairs in {section['dir']} were drawn by the source's weights and these settings",)
        writes: tuple[str, ...] = ()
    else:
        derived = (("pairs", f"{section['dir']}: missing; {section['count']} + {section['val_count']} (val) to draw"),)
        prepare = (f"draw {section['count'] + section['val_count']} (noise, latent) pairs with the source "
                   f"({section['sampler']}, {section['steps']} steps, guidance {section['guidance']})",)
        writes = (f"{Path(section['dir']).absolute()}/ (pair shards, meta.json)",)
    derived += (("training items", str(section["count"])),)
    return Resolution(cfg, depends, derived, prepare, writes, section["count"])
