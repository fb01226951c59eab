"""Configs written before the layered package (a run's ``config.yaml``, an exported file's metadata, a user's own
YAML) rewritten into today's form, so that old runs load, sample and resume.

What changed (besides targets that moved, ``ldm.core.aliases``):

- LatentDiffusion / ControlLDM: ``schedule``, ``parameterization``, ``loss_weighting``, ``min_snr_gamma`` and
  ``offset_noise`` became one ``objective`` node; ``learning_rate``, ``weight_decay``, ``warmup_steps`` and
  ``lr_decay`` an ``optimizer`` node; ``use_ema`` and ``ema_decay`` an ``ema`` node (``ldm.nets.ema.EMA``, or null
  for none); the ``sample_*`` grid settings (and a ControlNet's ``sample_count``) a
  ``SampleGrid`` / ``ControlSampleGrid`` callback.
- The VAE: the LightningModule is ``AutoencoderKLSystem``; its ``sample_every_n_steps`` / ``num_sample_images``
  became a ``ReconstructionGrid`` callback; its ``learning_rate``, ``lr_schedule`` and ``warmup_steps`` an
  ``optimizer`` node (the stages' one vocabulary, with the Adam betas it used), ``disc_learning_rate`` ``disc_lr``; a stage-2 model's inline ``first_stage`` node names the network
  ``ldm.nets.autoencoder.model.AutoencoderKL`` (architecture only).

One shorthand stays valid and is expanded here without a notice: a stage-2 / ControlNet model's ``compile: true``
(``false``) is a ``ldm.nets.compile.Compile`` node with Inductor's defaults (none).
"""

from __future__ import annotations

import copy
import logging

from ldm.core.aliases import resolve_alias

log = logging.getLogger(__name__)

LDM_TARGETS = ("ldm.systems.latent_diffusion.LatentDiffusion", "ldm.systems.controlnet.ControlLDM")
VAE_SYSTEM = "ldm.systems.autoencoder.AutoencoderKLSystem"
VAE_NET = "ldm.nets.autoencoder.model.AutoencoderKL"
VAE_NET_PARAMS = ("ddconfig", "embed_dim", "channels_last", "bicubic_skip")
OBJECTIVE = "ldm.diffusion.objective.DiffusionObjective"
OPTIMIZER = "ldm.systems.optim.AdamW"
EMA = "ldm.nets.ema.EMA"
COMPILE = "ldm.nets.compile.Compile"
EMA_KEPT_BY_DEFAULT = {"ldm.systems.latent_diffusion.LatentDiffusion": True, "ldm.systems.controlnet.ControlLDM": False}
SAMPLE_GRID = "ldm.training.samples.SampleGrid"
CONTROL_SAMPLE_GRID = "ldm.training.samples.ControlSampleGrid"
RECONSTRUCTION_GRID = "ldm.training.samples.ReconstructionGrid"

# old LatentDiffusion parameter → (new node, its parameter)
OBJECTIVE_KEYS = {"schedule": "schedule", "parameterization": "parameterization", "loss_weighting": "weighting",
                  "min_snr_gamma": "min_snr_gamma", "offset_noise": "offset_noise"}
OPTIMIZER_KEYS = {"learning_rate": "lr", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps",
                  "lr_decay": "decay"}
SAMPLE_KEYS = {"sample_every_n_steps": "every_n_steps", "sample_conditions": "conditions", "sample_steps": "steps",
               "sample_guidance": "guidance", "sample_sampler": "sampler", "sample_count": "count"}
VAE_SAMPLE_KEYS = {"sample_every_n_steps": "every_n_steps", "num_sample_images": "count"}
VAE_OPTIMIZER_KEYS = {"learning_rate": "lr", "lr_schedule": "decay", "warmup_steps": "warmup_steps"}
VAE_OLD_DEFAULTS = {"lr": 4.5e-6, "betas": [0.5, 0.9]}  # what the VAE's optimiser was when a config omitted it


def _take(params: dict, keys: dict[str, str]) -> dict:
    """Pop the old keys present in ``params``, renamed to their new names."""
    return {new: params.pop(old) for old, new in keys.items() if old in params}


def vae_network_node(node: dict) -> dict:
    """A VAE node (old LightningModule, system or network) as the network's node: architecture only."""
    params = node.get("params") or {}
    return {"target": VAE_NET, "params": {k: copy.deepcopy(params[k]) for k in VAE_NET_PARAMS if k in params}}


def _upgrade_ldm(node: dict, callbacks: list) -> bool:
    params = node.setdefault("params", {})
    changed = False
    objective = _take(params, OBJECTIVE_KEYS)
    if objective:
        params["objective"] = {"target": OBJECTIVE, "params": objective}
        changed = True
    optimizer = _take(params, OPTIMIZER_KEYS)
    if optimizer:
        params["optimizer"] = {"target": OPTIMIZER, "params": optimizer}
        changed = True
    if "use_ema" in params or "ema_decay" in params:
        kept = params.pop("use_ema", EMA_KEPT_BY_DEFAULT[resolve_alias(node["target"])])
        decay = params.pop("ema_decay", None)
        params["ema"] = {"target": EMA, "params": {} if decay is None else {"decay": decay}} if kept else None
        changed = True
    samples = _take(params, SAMPLE_KEYS)
    if samples:
        changed = True
        control = resolve_alias(node["target"]).endswith("ControlLDM")
        if samples.get("every_n_steps") and (control or samples.get("conditions")):
            grid = CONTROL_SAMPLE_GRID if control else SAMPLE_GRID
            samples.pop("conditions" if control else "count", None)
            callbacks.append({"target": grid, "params": samples})
    first_stage = params.get("first_stage")
    if isinstance(first_stage, dict) and resolve_alias(first_stage.get("target", "")) in (VAE_SYSTEM, VAE_NET):
        if first_stage != vae_network_node(first_stage):
            params["first_stage"] = vae_network_node(first_stage)
            changed = True
    return changed


def _upgrade_vae(node: dict, callbacks: list) -> bool:
    params = node.setdefault("params", {})
    samples = _take(params, VAE_SAMPLE_KEYS)
    if samples.get("every_n_steps"):
        callbacks.append({"target": RECONSTRUCTION_GRID, "params": samples})
    optimizer = _take(params, VAE_OPTIMIZER_KEYS)
    if "disc_learning_rate" in params:
        params["disc_lr"] = params.pop("disc_learning_rate")
        optimizer = optimizer or {}
    if optimizer and "optimizer" not in params:
        params["optimizer"] = {"target": OPTIMIZER, "params": {**VAE_OLD_DEFAULTS, **optimizer}}
    return bool(samples) or bool(optimizer)


def _expand_shorthands(params: dict) -> None:
    """``compile: true`` / ``false``: a ``Compile`` node with Inductor's defaults / none."""
    if isinstance(params.get("compile"), bool):
        params["compile"] = {"target": COMPILE, "params": {}} if params["compile"] else None


def upgrade_model_node(node: dict) -> tuple[dict, list[dict], bool]:
    """(today's form of a model node, the callbacks its old sample settings became, whether anything changed)."""
    node = copy.deepcopy(node)
    callbacks: list[dict] = []
    target = resolve_alias(node.get("target", "")) if isinstance(node.get("target"), str) else ""
    changed = target != node.get("target")
    node["target"] = target or node.get("target")
    if target in LDM_TARGETS:
        changed |= _upgrade_ldm(node, callbacks)
        _expand_shorthands(node["params"])
    elif target == VAE_SYSTEM:
        changed |= _upgrade_vae(node, callbacks)
    return node, callbacks, changed


def upgrade_config(cfg: dict, source: str = "config") -> dict:
    """A whole config (model, callbacks, …) in today's form; the input is not modified."""
    if not isinstance(cfg.get("model"), dict):
        return cfg
    node, callbacks, changed = upgrade_model_node(cfg["model"])
    if node == cfg["model"]:
        return cfg
    cfg = {**cfg, "model": node}
    if callbacks:
        cfg["callbacks"] = list(cfg.get("callbacks") or []) + callbacks
    if changed:
        log.info("%s was written before the layered package; read in today's form (ldm.core.migrate)", source)
    return cfg
