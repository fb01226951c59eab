"""Reflow (Liu et al. 2022, "Flow Straight and Fast", §2.2): draw (noise, latent) couplings from a trained flow model,
then fine-tune a copy of it on those pairs, whose straight interpolations its own ODE nearly follows.

    reflow:
      source: runs/ldm/<flow run>    # the trained model (its EMA weights) that draws the pairs
      dir: cache/reflow-shapes-text  # where the pairs live: shards of `noise` and `latent`, captions, meta.json
      count: 20000                   # training pairs (val_count held out)
      sampler: euler                 # how the pairs are drawn, with the model's conditioning and CFG …
      steps: 20
      guidance: 4.0                  # … at this scale

The pairs are conditioned on the source's own latent cache (its captions / labels, in order), and stored like that
cache (atomic shards, ``meta.json``; an interrupted run resumes from its finished shards). A cache drawn by another
model (weights hash), sampler or scale is refused. The stage completes the
model node from the source run (``complete_reflow``), draws or checks the pairs (``ensure_pairs``), and
``load_source_weights`` starts the copy from the source's EMA weights. Training then regresses v = ε − z at x_t = (1 − t)·z + t·ε of each pair.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.core.config import ConfigError, config_section
from ldm.data.latents import META_FILE, SHARD_PATTERN, CacheError, LatentDataset, read_meta, write_json_atomic
from ldm.diffusion.flow import FlowSchedule
from ldm.inference.loaders import describe_run
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd_base import load_run_system
from ldm.io.checkpoints import fit_report, load_file, save_file_atomic, select_ema, state_dict_of, tensors_hash
from ldm.io.runs import run_config
from ldm.training.cache import ensure_cache

log = logging.getLogger(__name__)

REFLOW_DEFAULTS = {"count": 20000, "val_count": 512, "sampler": "euler", "steps": 20, "guidance": 4.0,
                   "batch_size": 256, "shard_size": 4096, "seed": 0}
REFLOW_REQUIRED = ("source", "dir")
SPLIT_SEED_OFFSET = {"train": 0, "val": 10**9}  # the val pairs' noise seeds never meet the training ones
CACHE_VERSION = 1
INHERITED = ("unet", "cond_stage", "objective", "first_stage", "scale_factor", "image_size", "ema")


def reflow_section(cfg: dict) -> dict:
    """The config's ``reflow:`` section with defaults, checked for typos and missing keys."""
    return config_section(cfg, "reflow", REFLOW_DEFAULTS, REFLOW_REQUIRED, "naming the flow run and the pairs' folder")


def drawing(section: dict, source_hash: str) -> dict:
    """What identifies a pairs cache: the source's weights and how the pairs were drawn."""
    return {"source_hash": source_hash, "sampler": section["sampler"], "steps": section["steps"],
            "guidance": section["guidance"], "seed": section["seed"]}


def draw_split(pipe: Pipeline, conditions: LatentDataset, out_dir: Path, split: str, section: dict) -> None:
    """Draw ``count`` pairs of one split into shards (finished shards are kept)."""
    count = section["count"] if split == "train" else section["val_count"]
    key = pipe.condition_key
    seed0 = section["seed"] + SPLIT_SEED_OFFSET[split]
    out_dir.mkdir(parents=True, exist_ok=True)
    terminal = sys.stderr.isatty()  # a bar in a terminal; a line per shard in a log file
    bar = tqdm(total=count, desc=f"reflow pairs ({split})", unit="pair", disable=not terminal)
    for shard in range(math.ceil(count / section["shard_size"])):
        start, stop = shard * section["shard_size"], min((shard + 1) * section["shard_size"], count)
        name = out_dir / SHARD_PATTERN.format(shard)
        if name.with_suffix(".json").is_file() and name.with_suffix(".safetensors").is_file():
            bar.update(stop - start)
            continue
        noises, latents, labels = [], [], []
        for lo in range(start, stop, section["batch_size"]):
            hi = min(lo + section["batch_size"], stop)
            batch = [conditions[i % len(conditions)][key] for i in range(lo, hi)]
            noise = torch.stack([torch.randn(pipe.latent_shape(pipe.image_size, pipe.image_size),
                                             generator=torch.Generator().manual_seed(seed0 + i)) for i in range(lo, hi)])
            latents.append(pipe.latents_for(batch, noise, section["steps"], section["guidance"], section["sampler"]).cpu())
            noises.append(noise)
            labels += batch
            bar.update(hi - lo)
        save_file_atomic({"noise": torch.cat(noises), "latent": torch.cat(latents).float()}, name.with_suffix(".safetensors"))
        write_json_atomic({key: labels}, name.with_suffix(".json"))
        if not terminal:
            log.info("reflow pairs (%s): %d/%d drawn, shard %s written", split, stop, count, name.name)
    bar.close()


def build_pairs(section: dict) -> dict:
    """Draw (or finish drawing) the pairs of ``section`` with the source run; returns the cache's meta."""
    info = describe_run(section["source"])
    pipe = Pipeline.from_run(info.run_dir)
    if not isinstance(pipe.schedule, FlowSchedule):
        raise ConfigError(f"reflow.source: {info.run_dir} is not a rectified-flow run (its schedule is "
                          f"{type(pipe.schedule).__name__}); reflow straightens a flow's paths")
    out = Path(section["dir"])
    identity = drawing(section, tensors_hash(pipe.model.state_dict()))
    if (out / META_FILE).is_file():
        previous = {k: v for k, v in read_meta_any(out).items() if k in identity}
        if previous != identity:
            raise CacheError(f"{out} holds pairs drawn otherwise ({previous}) than this config asks ({identity}); "
                             "delete it or set reflow.dir to another folder")
    meta = {"version": CACHE_VERSION, **identity, "source": str(info.run_dir), "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, out / META_FILE)
    source_cache = run_config(info.run_dir)["cache"]["dir"]
    for split in ("train", "val"):
        draw_split(pipe, LatentDataset(source_cache, split), out / split, split, section)
    meta.update(count=section["count"] + section["val_count"], scale_factor=pipe.scale_factor,
                image_size=[pipe.image_size, pipe.image_size],
                latent_shape=list(pipe.latent_shape(pipe.image_size, pipe.image_size)), complete=True)
    write_json_atomic(meta, out / META_FILE)
    return meta


def read_meta_any(cache_dir: Path) -> dict:
    """``meta.json`` whether or not the cache is complete."""
    return json.loads((cache_dir / META_FILE).read_text())


def complete_reflow(cfg: dict) -> dict:
    """The reflow stage's completion: pin the source run and take the model it trains from it (unless set); in
    ``cfg``, which is returned (the stage's plan calls it on its own copy)."""
    section = reflow_section(cfg)
    source = describe_run(section["source"]).run_dir  # a stage-2 run, or one line naming what it is
    cfg["reflow"]["source"] = str(source)  # pinned: `latest` moves, the run does not
    params = cfg.setdefault("model", {}).setdefault("params", {})
    source_params = run_config(source)["model"].get("params") or {}
    for key in INHERITED:
        if params.get(key) is None and key in source_params:
            params[key] = copy.deepcopy(source_params[key])
    return cfg


def ensure_pairs(cfg: dict, config_path: str | None = None) -> dict:
    """The reflow stage's ``before_build``: draw the pairs (resuming finished shards) or check the ones there."""
    section = reflow_section(cfg)
    ensure_cache(run_config(section["source"]))  # the conditions come from the source's own latent cache
    try:
        meta = read_meta(section["dir"])
    except CacheError:
        meta = build_pairs(section)
    else:
        source = load_run_system(describe_run(section["source"]))[0]
        expected = drawing(section, tensors_hash(source.model.state_dict()))
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise CacheError(f"{section['dir']} holds pairs drawn otherwise ({found}) than this config asks "
                             f"({expected}); delete it or set reflow.dir to another folder")
    log.info("reflow pairs: %s (%d)", section["dir"], meta["count"])
    return meta


@torch.no_grad()
def load_source_weights(system: torch.nn.Module, cfg: dict) -> dict:
    """The reflow stage's ``init_weights``: the source run's weights, its EMA in the U-Net (and its EMA restarted)."""
    ckpt = describe_run(cfg["reflow"]["source"]).checkpoint
    state = state_dict_of(load_file(ckpt))
    unet_keys = [f"model.{n}" for n, _ in system.model.named_parameters()]
    state, ema = select_ema(state, unet_keys, use_ema=True)
    wanted = {k: v.shape for k, v in system.state_dict().items() if not k.startswith("model_ema.")}
    state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    fit_report(wanted, state, f"the reflow source {ckpt}")  # the model node was copied from it: exactly its keys
    system.load_state_dict(state, strict=False)  # all but the EMA, restarted below
    system.restart_ema()  # a fresh EMA of the starting weights
    return {"checkpoint": str(ckpt), "ema": ema}
