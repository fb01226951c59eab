"""Stage 3's base model: name it once, take its architecture and weights from it.

    model:
      target: ldm.systems.controlnet.ControlLDM
      params:
        base: runs/ldm/latest                 # a stage-2 run (its last checkpoint, EMA weights), or:
        base_ckpt: v1-5-pruned.safetensors    # a Stable Diffusion file …
        base_config: configs/sd/v1-inference.yaml   # … and its inference config

``complete_model_node`` pins ``base`` to the run it names now and fills in what the ControlLDM shares with its
base (``INHERITED``: U-Net, text encoder, objective, VAE, scale) unless the config sets it, so the run's saved
config builds the model alone. ``prepare_controlnet`` is stage 3's ``before_build``: complete the model node,
then build or check the hint-carrying latent cache (same VAE as the base). ``load_base_weights`` is its
``init_weights``: a new run's system gets the base's weights and a ControlNet copied from its U-Net.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ldm.core.config import ConfigError
from ldm.data.latents import CacheError
from ldm.inference.loaders import load_autoencoder
from ldm.inference.sd import inference_node, read_model_config, read_sd_state, to_model_layout
from ldm.inference.sd_control import with_control_stage
from ldm.io.checkpoints import UNET_PREFIX, VAE_PREFIX, fit_report, load_file, select_ema, state_dict_of
from ldm.io.lineage import LINEAGE_KEY, pin_paths, vae_hash_of
from ldm.io.runs import LATEST_LINK, checkpoint_for, resolve_run, run_config
from ldm.nets.controlnet import copy_unet_weights
from ldm.systems.controlnet import DEFAULT_HINT_CHANNELS
from ldm.training.cache import LoadVae, cache_section, ensure_cache

log = logging.getLogger(__name__)
# What a ControlLDM takes from its base's model params when its own config does not set it.
INHERITED = ("unet", "cond_stage", "objective", "first_stage", "scale_factor", "image_size")
# The parts of a ControlLDM's state dict that come from the base (the rest is the ControlNet and the EMAs).
BASE_PREFIXES = ("model.", "cond_stage_model.", VAE_PREFIX, "scale_factor", "image_size")
PREPARATION_ONLY = ("hint_channels",)  # used here to size the ControlNet, then dropped from the node


def _base_source(params: Mapping) -> tuple[str | None, str | None, str | None]:
    """(base, base_ckpt, base_config) of a ControlLDM's params, checked for a consistent choice."""
    base, ckpt, config = params.get("base"), params.get("base_ckpt"), params.get("base_config")
    if base and (ckpt or config):
        raise ConfigError("model.params: give either base (a stage-2 run) or base_ckpt + base_config (an SD file)")
    if bool(ckpt) != bool(config):
        raise ConfigError("model.params.base_ckpt and base_config go together: the SD file and its inference "
                          "config (configs/sd/v1-inference.yaml for SD 1.x)")
    return base, ckpt, config


def base_model_node(base: str | None = None, base_config: str | os.PathLike | None = None) -> dict:
    """The base's model node: a stage-2 run's config, or an SD inference config (made ready to load into)."""
    if base:
        node = run_config(base).get("model") or {}
        if "unet" not in (node.get("params") or {}):
            raise ConfigError(f"model.params.base: {base} is not a stage-2 (latent diffusion) run: its model is "
                              f"{node.get('target', 'missing')}; name a run under runs/ldm/")
        return node
    return read_model_config(str(base_config))


def _inherit(params: dict, inherited: Mapping) -> None:
    """Fill ``INHERITED`` keys the config leaves unset; an ``objective`` without a schedule takes the base's."""
    for key in INHERITED:
        if key in inherited and params.get(key) is None:
            params[key] = copy.deepcopy(inherited[key])
    objective, base_objective = params.get("objective") or {}, inherited.get("objective") or {}
    own = objective.setdefault("params", {}) if objective else {}
    base_schedule = (base_objective.get("params") or {}).get("schedule")
    if objective and own.get("schedule") is None and base_schedule is not None:
        own["schedule"] = copy.deepcopy(base_schedule)


def complete_model_node(node: dict) -> dict:
    """Pin ``base`` to its run directory and fill ``INHERITED`` params in from the base (in place; returned)."""
    params = node.setdefault("params", {})
    base, _, config = _base_source(params)
    if base or config:
        if base:
            params["base"] = str(resolve_run(base))  # `runs/ldm/latest` moves; the run directory does not
        _inherit(params, base_model_node(params.get("base"), config).get("params") or {})
    if params.get("control_stage") is None:  # spelled out, so the run's config builds without the VAE
        params["control_stage"] = control_stage_node(node)
    for key in PREPARATION_ONLY:
        params.pop(key, None)
    return node


def control_stage_node(node: Mapping) -> dict:
    """The ControlNet node for a model node: the U-Net's architecture, the hint channels, the VAE's factor."""
    params = {k: v for k, v in (node.get("params") or {}).items() if k not in ("control_stage", *PREPARATION_ONLY)}
    full = inference_node({"target": node["target"], "params": params})  # a VAE run's path → its architecture
    hint_channels = (node.get("params") or {}).get("hint_channels", DEFAULT_HINT_CHANNELS)
    return with_control_stage(full, hint_channels)["params"]["control_stage"]


def base_state(system: nn.Module, base: str | None = None, base_ckpt: str | None = None,
               base_config: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """The base's weights in the system's layout (EMA weights in the U-Net when the base has them), and info."""
    if base:
        ckpt = checkpoint_for(base)
        state = state_dict_of(load_file(ckpt))
        unet_keys = [UNET_PREFIX + n for n, _ in system.model.diffusion_model.named_parameters()]
        state, ema = select_ema(state, unet_keys, use_ema=True)
        return state, {"checkpoint": str(ckpt), "ema": ema}
    if base_ckpt:
        state, info = to_model_layout(system, read_sd_state(base_ckpt), use_ema=True)
        return state, {"checkpoint": str(base_ckpt), **info}
    raise ConfigError("the ControlLDM has no base to load: set model.params.base (a stage-2 run) or "
                      "base_ckpt + base_config (an SD file)")


@torch.no_grad()
def load_base_weights(system: nn.Module, cfg: Mapping | None = None) -> dict:
    """Stage 3's ``init_weights``: the base's U-Net, text encoder, VAE (when the system has one) and scale factor,
    strictly; then the ControlNet's encoder copied from the U-Net and the EMAs restarted. Nothing without a base."""
    source = system.base_source
    if not any(source.values()):
        return {}
    state, info = base_state(system, **source)
    skip = () if system.first_stage_model is not None else (VAE_PREFIX,)
    wanted = {k: v.shape for k, v in system.state_dict().items() if k.startswith(BASE_PREFIXES)
              and not (skip and k.startswith(skip))}
    state = {k: v for k, v in state.items() if k.startswith(BASE_PREFIXES) and not (skip and k.startswith(skip))}
    fit_report(wanted, state, f"the base {info['checkpoint']}")  # names and shapes: exactly the base's part
    system.load_state_dict(state, strict=False)  # the ControlNet and the EMAs are not the base's
    copy_unet_weights(system.control_model, system.model.diffusion_model)
    system.restart_ema()
    return info


# ---------------------------------------------------------------------------------------------- stage set-up


def cache_has_hints(cache_dir: str | os.PathLike) -> bool:
    """Whether every split of a latent cache stores hints (its first shard holds a ``hint`` tensor)."""
    shards = [sorted(split.glob("shard-*.safetensors"))[:1] for split in Path(cache_dir).iterdir() if split.is_dir()]
    if not any(shards):
        return False
    for (shard,) in (s for s in shards if s):
        with safe_open(str(shard), framework="pt") as f:
            if "hint" not in f.keys():
                return False
    return True


def cache_on_base_vae(cfg: dict, load_vae: LoadVae = load_autoencoder) -> None:
    """The cache must be encoded by the VAE whose weights the base's checkpoint holds (its latent space), whatever
    ``cache.vae`` names now. When it names other weights through a ``latest`` link (the recipe's default, moved by a
    newer VAE), the VAE the base's config pins is used instead, with a line saying so; otherwise a one-line refusal."""
    params, section = cfg["model"]["params"], cfg["cache"]
    if not params.get("base"):
        return  # an SD file's VAE is named by cache.vae + cache.vae_config as the file itself
    own = vae_hash_of(checkpoint_for(params["base"]))
    cache_vae = load_vae(section["vae"], section.get("vae_config"))[1]
    if cache_vae["hash"] == own:
        return
    given = (cfg.get(LINEAGE_KEY) or {}).get("cache.vae", section["vae"])
    first_stage = params.get("first_stage")
    if Path(str(given)).name == LATEST_LINK and isinstance(first_stage, str) and Path(first_stage).exists() \
            and load_vae(first_stage, None)[1]["hash"] == own:
        log.info("cache.vae %s is now %s (VAE weights %s), not the VAE the base %s holds (%s): encoding with the "
                 "base's own VAE %s", given, cache_vae["checkpoint"], cache_vae["hash"], params["base"], own,
                 first_stage)
        section["vae"], section["vae_config"] = first_stage, None
        return
    raise CacheError(
        f"cache.vae {given} (VAE weights {cache_vae['hash']}) is not the VAE the base model was trained with: "
        f"{params['base']} holds {own}; set cache.vae to it (model.params.first_stage of the base's config.yaml: "
        f"{first_stage}) and a new cache.dir if {section['dir']} exists")


def prepare_controlnet(cfg: dict, config_path: str | None = None) -> dict:
    """Complete the model from its base (in ``cfg``), then build or check the hint-carrying cache; returns ``cfg``."""
    complete_model_node(cfg["model"])
    pin_paths(cfg)  # what the base's config named by a link (a run from before runs pinned theirs), pinned too
    prepare_control_cache(cfg, config_path)
    return cfg


def prepare_control_cache(cfg: dict, config_path: str | None = None, load_vae: LoadVae = load_autoencoder) -> None:
    """Stage 3's preparation of a completed config: the cache's VAE is the base's; build or check the cache, which
    must carry hints."""
    if "cache" not in cfg:
        return  # images encoded on the fly (e.g. an SD base on a folder of images with stored edge maps)
    section = cache_section(cfg)
    command = f"python stages/cache_latents.py --cfg {config_path or '<this config>'} --out {section['dir']}"
    cache_on_base_vae(cfg, load_vae)  # checked by the weights, before anything is encoded
    cache_dir = Path(section["dir"])
    hintless = cache_dir.is_dir() and any(cache_dir.iterdir()) and not cache_has_hints(cache_dir)
    if not hintless:  # a cache without hints is refused for that first, whatever data it was built from
        ensure_cache(cfg, config_path, load_vae=load_vae)
    if not cache_has_hints(cache_dir):
        raise CacheError(
            f"the latent cache {section['dir']} has no hints (edge maps): it was built from datasets that do not "
            "yield them. Give cache.data datasets that do (ShapesDataset or ImageFolderDataset hint: true, or ImageFolderDataset hint_dir) and "
            f"a new cache.dir, then build it: {command} (or let this stage build it)")
