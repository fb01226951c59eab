"""Loaders: runs on disk → built systems. Systems never read files; the training driver and the Pipeline call these.

``build_system`` turns a model node into a system, loading the stage-1 run a stage-2 config names by path
(``first_stage: runs/vae/latest``); ``load_autoencoder`` loads such a run's VAE. ``describe_run`` checks a
stage-2 or ControlNet run cheaply (configs only, nothing heavy built) so a command line can refuse bad
arguments before loading (``ldm.inference.sd_base.load_run_system`` builds it and loads its checkpoint).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.core.config import ConfigError, get_obj_from_str, instantiate_from_config, load_config
from ldm.core.errors import UserError
from ldm.core.migrate import vae_network_node
from ldm.diffusion.schedule import Schedule
from ldm.io.checkpoints import CheckpointError, load_file, state_dict_of
from ldm.io.lineage import VAE_TRAINING_ONLY, read_vae_state, vae_hash_from
from ldm.io.module_weights import load_strict, params_on_meta
from ldm.io.runs import RunError, checkpoint_for, resolve_run, run_config
from ldm.nets.autoencoder.model import AutoencoderKL, downsampling_factor
from ldm.systems.classifier import NoisyClassifier
from ldm.systems.controlnet import ControlLDM
from ldm.systems.latent_diffusion import LatentDiffusion

DEFAULT_RUN = "runs/ldm/latest"
CONTROL_STAGE_PARAM = "control_stage"


class PipelineError(UserError, ValueError):
    """A request the pipeline cannot draw: bad size, steps, guidance, sampler, conditions or control image."""


class NotAnLDMRunError(PipelineError):
    """A run directory that holds no stage-2 (latent diffusion) model, e.g. a VAE run."""


# ---------------------------------------------------------------------------------------------- stage 1


def vae_node(first_stage: str | os.PathLike | Mapping, referrer: str | os.PathLike = "the config") -> dict:
    """The VAE network's node (architecture only) for a stage-1 run named by path, or an inline node."""
    if isinstance(first_stage, Mapping):
        return vae_network_node(dict(first_stage))
    try:
        return vae_network_node(run_config(first_stage)["model"])
    except RunError as e:
        raise RunError(f"the VAE run {first_stage} that {referrer} names (model.params.first_stage) is gone "
                       f"({e}); restore its folder (its config.yaml is enough for sampling)") from e


def sd_vae_node(config: str | os.PathLike) -> dict:
    """The VAE network's node of a Stable Diffusion inference config (``configs/sd/*.yaml``)."""
    first_stage = ((load_config(config).get("model") or {}).get("params") or {}).get("first_stage")
    if not isinstance(first_stage, Mapping):
        raise ConfigError(f"{config}: model.params.first_stage is not a VAE node, so the config does not describe "
                          "the SD file's VAE (give its inference config, e.g. configs/sd/v1-inference.yaml)")
    return vae_node(first_stage)


def load_autoencoder(spec: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[AutoencoderKL, dict]:
    """A frozen, eval-mode VAE from a stage-1 run (``runs/vae/latest``) or a checkpoint inside one, or, with
    ``config`` (its inference config), the ``first_stage_model.*`` of a public Stable Diffusion file.

    Returns the network and its identity: checkpoint path, hash of its weights, downsampling factor.
    """
    public = config is not None
    if not public:
        ckpt = checkpoint_for(spec)
        node = vae_node(ckpt)
    else:
        ckpt = Path(spec)
        if not ckpt.is_file():
            raise CheckpointError(f"checkpoint not found: {ckpt}")
        node = sd_vae_node(config)
    state = read_vae_state(ckpt, public)  # read once: the weights and their hash
    with params_on_meta():  # every weight comes from the file: no random init, no second copy
        vae = instantiate_from_config(node, "first_stage")
    load_strict(vae, state, f"VAE checkpoint {ckpt}", ignore=VAE_TRAINING_ONLY, assign=True)
    vae.eval().requires_grad_(False)
    info = {"checkpoint": str(ckpt), "hash": vae_hash_from(ckpt, state, public),
            "downsampling_factor": vae.downsampling_factor, "embed_dim": vae.embed_dim}
    return vae, info


def build_system(node: Mapping, path: str = "model", load_first_stage: bool = True,
                 load_vae: Callable[..., tuple] = load_autoencoder) -> nn.Module:
    """A system from its model node. A ``first_stage`` named by run path is loaded with its weights (by
    ``load_vae``, as ``load_autoencoder``), or with ``load_first_stage=False`` built from the run's config alone (its
    weights then come from a checkpoint: build it under ``ldm.io.module_weights.params_on_meta``, as
    ``ldm.inference.sd_base.load_run_system`` does)."""
    first_stage = (node.get("params") or {}).get("first_stage")
    if not isinstance(first_stage, (str, os.PathLike)):
        return instantiate_from_config(node, path)
    if load_first_stage:
        vae = load_vae(first_stage, None)[0]
    else:
        vae = instantiate_from_config(vae_node(first_stage), f"{path}.params.first_stage")
    return instantiate_from_config(node, path, first_stage=vae)


# ---------------------------------------------------------------------------------------------- stage-2 runs


@dataclass(frozen=True)
class RunSummary:
    """What a stage-2 (or ControlNet) run draws, read from its config alone (nothing heavy is built)."""

    run_dir: Path
    checkpoint: Path
    config: dict
    condition_key: str  # "caption" (text run) or "label" (class run)
    n_classes: int | None
    first_stage: str | dict  # the VAE run (stage 2), or its model node (a ControlNet on an SD file)
    downsampling_factor: int  # pixels per latent cell, from the VAE's config
    controlnet: bool = False  # a ControlNet run: sampling needs a control image
    class_names: list[str] | None = None  # a class run's names (label i is class_names[i]), e.g. its class folders


def describe_run(run: str | os.PathLike = DEFAULT_RUN) -> RunSummary:
    """Check that ``run`` (a run directory, ``runs/ldm/latest`` or a .ckpt inside one) is a stage-2 run; summarise it."""
    run_dir = resolve_run(run)
    cfg = run_config(run_dir)
    node = cfg.get("model") or {}
    target = node.get("target", "")
    if not isinstance(target, str) or not is_subclass(target, LatentDiffusion):
        raise NotAnLDMRunError(f"{run} is not a stage-2 (latent diffusion) run: its model is {target or 'missing'}; "
                               f"name a run under runs/ldm/ (e.g. {DEFAULT_RUN}) or runs/controlnet/")
    params = node.get("params") or {}
    first_stage = params.get("first_stage")
    if not first_stage:
        raise NotAnLDMRunError(f"{run}: model.params.first_stage is empty, so there is no VAE to decode with")
    cond = params.get("cond_stage") or {}
    cond_params = cond.get("params") or {}
    key = cond_params.get("key") or _default_argument(cond.get("target", ""), "key") or "caption"
    n_classes = cond_params.get("n_classes") if key == "label" else None
    control = is_subclass(target, ControlLDM) or CONTROL_STAGE_PARAM in params
    first_stage = first_stage if isinstance(first_stage, Mapping) else str(first_stage)
    factor = downsampling_factor((vae_node(first_stage, run).get("params") or {}).get("ddconfig") or {})
    names = cond_params.get("class_names") if key == "label" else None
    return RunSummary(run_dir, checkpoint_for(run), cfg, key, n_classes, first_stage, factor, control, names)


def resolve_class(value: str | int, names: list[str] | None, n_classes: int | None, where: str = "--class") -> int:
    """A class label from a class name (a run that keeps its names) or an index; a name wins over an index."""
    text = str(value).strip()
    if names and text in names:
        return names.index(text)
    try:
        label = int(text)
    except ValueError:
        known = f"its classes are {_names_text(names)}" if names else "this run keeps no class names: give an index"
        raise PipelineError(f"{where} {text!r} is not a class of this run: {known}") from None
    if n_classes is not None and not 0 <= label < n_classes:
        named = f" (or a name: {_names_text(names)})" if names else ""
        raise PipelineError(f"{where} {label} is out of range: this run has classes 0..{n_classes - 1}{named}")
    return label


def _names_text(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", … ({len(names)} in all)" if len(names) > shown else "")


def is_subclass(target: str, base: type) -> bool:
    """Whether the config target ``target`` names a subclass of ``base``."""
    try:
        cls = get_obj_from_str(target)
    except UserError:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _default_argument(target: str, name: str):
    """The default of constructor argument ``name`` of a config target (None when it has none)."""
    try:
        param = inspect.signature(get_obj_from_str(target)).parameters.get(name)
    except (UserError, TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def load_classifier(run: str | os.PathLike) -> tuple[nn.Module, Schedule, float]:
    """A classifier run's network (frozen, eval mode), the schedule it was trained on and its latents' scale factor."""
    ckpt = checkpoint_for(run)
    node = run_config(ckpt).get("model") or {}
    if not is_subclass(node.get("target", ""), NoisyClassifier):
        raise NotAnLDMRunError(f"{run} is not a classifier run (stages/train_classifier.py): its model is "
                               f"{node.get('target', 'missing')}")
    with params_on_meta():  # every weight comes from the checkpoint
        system = instantiate_from_config(node, "model")
    load_strict(system, state_dict_of(load_file(ckpt)), f"checkpoint {ckpt}", assign=True)
    return system.classifier.eval().requires_grad_(False), system.schedule, float(system.scale_factor)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
