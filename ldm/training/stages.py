"""The training stages: each is its default config plus what completes the config before it is checked (the model
reflow and a fine-tune of an SD file inherit), what runs before the model is built (the latent cache, a ControlNet's
base model, reflow's pairs) and what initialises a new run's weights (a base's). ``ldm.training.driver.train`` looks
them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ldm.training.cache import ensure_cache, prepare_stage2
from ldm.training.controlnet_base import load_base_weights, prepare_controlnet
from ldm.training.reflow import complete_reflow, ensure_pairs, load_source_weights
from ldm.training.sd_finetune import complete_from_base, resume_from_base, start_from_base
from ldm.training.text_cache import build_stage2_system

Complete = Callable[[dict], object]  # (config): fills in what the config inherits, before it is checked
BeforeBuild = Callable[[dict, str], object]  # (config, config path): prepares what the model and data need
InitWeights = Callable[[nn.Module, dict], object]  # (model, config): a new run's initial weights
ResumeWeights = Callable[[nn.Module, dict], object]  # (model, config): what a resumed run's checkpoints do not hold
BuildModel = Callable[[dict], nn.Module]  # (config): the system, where a stage builds it otherwise than from model:


@dataclass(frozen=True)
class Stage:
    """One training stage: its runs folder name, default config and hooks."""

    name: str
    default_config: str
    before_build: BeforeBuild | None = None
    init_weights: InitWeights | None = None
    complete: Complete | None = None
    resume_weights: ResumeWeights | None = None
    build_model: BuildModel | None = None


STAGES: dict[str, Stage] = {
    "vae": Stage("vae", "configs/vae/shapes-kl-f4.yaml"),
    "ldm": Stage("ldm", "configs/ldm/shapes-text.yaml", before_build=prepare_stage2, init_weights=start_from_base,
                 complete=complete_from_base, resume_weights=resume_from_base, build_model=build_stage2_system),
    "controlnet": Stage("controlnet", "configs/controlnet/shapes-canny.yaml", before_build=prepare_controlnet,
                        init_weights=load_base_weights),
    "classifier": Stage("classifier", "configs/classifier/shapes-latent.yaml", before_build=ensure_cache),
    "reflow": Stage("reflow", "configs/ldm/shapes-text-reflow.yaml", complete=complete_reflow,
                    before_build=ensure_pairs, init_weights=load_source_weights),
}
