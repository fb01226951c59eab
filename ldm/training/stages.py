"""The training stages: each is its default config plus how its config is resolved into a plan (what the model
inherits from a base or source run, the class names of its data: ``ldm.training.resolve``), what runs before the
model is built (the latent cache, a ControlNet's hint checks, reflow's pairs) and what initialises a new run's
weights (a base's). ``ldm.training.driver.train`` looks them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ldm.training.cache import LoadVae, ensure_cache, prepare_stage2
from ldm.training.cli import DEFAULT_CONFIGS
from ldm.training.controlnet_base import load_base_weights, prepare_control_cache
from ldm.training.plan import Resolution, Resolver
from ldm.training.reflow import ensure_pairs, load_source_weights
from ldm.training.resolve import resolve_controlnet, resolve_images, resolve_reflow, resolve_stage2
from ldm.training.sd_finetune import resume_from_base, start_from_base
from ldm.training.text_cache import build_stage2_system

Prepare = Callable[[dict, str, LoadVae], object]  # (resolved config, its path, VAE loader): caches, pairs, checks
InitWeights = Callable[[nn.Module, dict], object]  # (model, config): a new run's initial weights
ResumeWeights = Callable[[nn.Module, dict], object]  # (model, config): what a resumed run's checkpoints do not hold
BuildModel = Callable[[dict, LoadVae], nn.Module]  # (config, VAE loader): the system, built otherwise than from model:


def unchanged(cfg: dict, config_path: str) -> Resolution:
    """A config that needs no completion."""
    return Resolution(cfg)


def _ensure_cache(cfg: dict, config_path: str, load_vae: LoadVae) -> dict:
    return ensure_cache(cfg, config_path, load_vae=load_vae)


def _ensure_pairs(cfg: dict, config_path: str, load_vae: LoadVae) -> dict:
    return ensure_pairs(cfg, config_path)


@dataclass(frozen=True)
class Stage:
    """One training stage: its runs folder name, default config and hooks."""

    name: str
    default_config: str
    resolve: Resolver = unchanged
    prepare: Prepare | None = None
    init_weights: InitWeights | None = None
    resume_weights: ResumeWeights | None = None
    build_model: BuildModel | None = None


STAGES: dict[str, Stage] = {
    "vae": Stage("vae", DEFAULT_CONFIGS["vae"], resolve=resolve_images),
    "ldm": Stage("ldm", DEFAULT_CONFIGS["ldm"], resolve=resolve_stage2, prepare=prepare_stage2,
                 init_weights=start_from_base, resume_weights=resume_from_base, build_model=build_stage2_system),
    "controlnet": Stage("controlnet", DEFAULT_CONFIGS["controlnet"], resolve=resolve_controlnet,
                        prepare=prepare_control_cache, init_weights=load_base_weights),
    "classifier": Stage("classifier", DEFAULT_CONFIGS["classifier"], resolve=resolve_stage2, prepare=_ensure_cache),
    "reflow": Stage("reflow", DEFAULT_CONFIGS["reflow"], resolve=resolve_reflow, prepare=_ensure_pairs,
                    init_weights=load_source_weights),
}
