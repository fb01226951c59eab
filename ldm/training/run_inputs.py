"""A run trains on what it records: its inputs pinned when it starts, and a resume refused when they or its objective
changed.

``pin_and_check`` (the driver calls it once the config is loaded) pins every run or file the config names
(``ldm.io.lineage``) and, on a resume, compares the config with the run's own: the model, its objective (schedule,
parameterisation, conditioning) and recipe must be the run's, each input the one its ``lineage.json`` records, and
the latent cache's VAE the one whose weights the run's checkpoint holds. A refusal is one line naming both sides,
raised before anything is written, so the run's ``config.yaml`` stays as it was. ``record_lineage`` writes a new run's
``lineage.json`` (never rewritten on resume).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ldm.core.config import ConfigError
from ldm.data.latents import META_FILE
from ldm.io.checkpoints import VAE_PREFIX, load_file, state_dict_of
from ldm.io.lineage import (
    LINEAGE_KEY,
    Input,
    identify_all,
    inputs_record,
    pin_paths,
    read_lineage,
    vae_weights,
    weights_hash,
    write_lineage,
)
from ldm.io.runs import resolve_run, run_config

log = logging.getLogger(__name__)
STAGE_SCRIPTS = {"vae": "train_vae.py", "ldm": "train_ldm.py", "controlnet": "train_controlnet.py",
                 "classifier": "train_classifier.py", "reflow": "train_reflow.py"}
# What a resumed run must keep: the model, its objective and conditioning, its adapters, and its recipe.
RECIPE_KEYS = ("model.target", "model.params.objective", "model.params.cond_stage", "model.params.lora", "name")
DERIVED_PARAMS = ("class_names",)  # filled in from the data at start: not part of what a user chooses
# Inputs a resumed run reads again: the VAE (its latent space, the cache) and a public base file (a LoRA run's
# checkpoints hold only its adapters). The others (a ControlNet's base run, a reflow source) live on in its checkpoint.
REFUSED_ROLES = ("vae", "base_file")
FIX = "resume with the run's own config (drop --cfg and the override), or start a new run"


class ResumeError(ConfigError):
    """A resume whose config, objective or inputs are not the run's own."""


def _get(cfg: Mapping, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _chosen(value: Any) -> Any:
    """A config value without what the stage derives from the data (a class run's names)."""
    if isinstance(value, Mapping):
        return {k: _chosen(v) for k, v in value.items() if k not in DERIVED_PARAMS}
    return value


def first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first key where two config values differ: (dotted path, old, new), or None when equal."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in dict.fromkeys([*old, *new]):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def check_stage_of(stage: str, resume: str | os.PathLike) -> None:
    """Refuse to resume a run of another stage (its folder is ``<runs>/<its stage>/<name>``), naming its script."""
    run_dir = resolve_run(resume)
    own = run_dir.parent.name
    if own in STAGE_SCRIPTS and own != stage:
        raise ResumeError(f"--resume {resume}: {run_dir.name} is a {own} run, not a {stage} run; resume it with "
                          f"python stages/{STAGE_SCRIPTS[own]} --resume {run_dir}, or name a run under "
                          f"{run_dir.parent.parent / stage}/")


def check_recipe(saved: Mapping, cfg: Mapping, run_dir: Path) -> None:
    """The model, objective, conditioning, adapters and recipe name must be the run's own."""
    for key in RECIPE_KEYS:
        found = first_difference(_chosen(_get(saved, key)), _chosen(_get(cfg, key)), key)
        if found:
            path, old, new = found
            raise ResumeError(f"--resume {run_dir}: {path} is {old!r} in the run but {new!r} in this config: another "
                              f"objective or recipe would train the run's weights on something else; {FIX}")


def check_inputs(inputs: list[Input], run_dir: Path) -> None:
    """Each input must be the one the run's ``lineage.json`` records (its VAE weights, its file)."""
    record = read_lineage(run_dir)
    recorded = {entry["key"]: entry for entry in (record or {}).get("inputs", [])}
    for now in inputs:
        then = recorded.get(now.key)
        if then is None:
            continue
        field = "vae_hash" if now.role == "vae" else "hash"
        if not (then.get(field) and getattr(now, field) and then[field] != getattr(now, field)):
            continue
        if now.role not in REFUSED_ROLES:  # its weights live on in the run's checkpoint
            log.warning("%s %s changed since %s started (%s %s, now %s); its checkpoint holds what it took from it, so "
                        "it resumes", now.key, now.path, run_dir, field, then[field], getattr(now, field))
            continue
        raise ResumeError(
                f"--resume {run_dir}: {now.key} {now.as_given} is now {now.path} ({field} {getattr(now, field)}), but "
                f"the run was built from {then['path']} ({field} {then[field]}, recorded in its lineage.json); "
                f"set {now.key}={then['path']} (or restore that file), or start a new run")


def check_cache_vae(inputs: list[Input], ckpt: Path, run_dir: Path) -> None:
    """The latent cache's VAE must be the one whose weights the run's checkpoint holds (runs without lineage too)."""
    cache_vae = next((i for i in inputs if i.key == "cache.vae" and i.vae_hash), None)
    if cache_vae is None:
        return
    state = state_dict_of(load_file(ckpt, mmap=True))
    if not any(k.startswith(VAE_PREFIX) for k in state):
        return
    own = weights_hash(vae_weights(state))
    if own != cache_vae.vae_hash:
        raise ResumeError(
            f"--resume {run_dir}: its checkpoint holds VAE weights {own}, but cache.vae {cache_vae.as_given} is now "
            f"{cache_vae.path} (VAE weights {cache_vae.vae_hash}): the link moved or the VAE was retrained, and a "
            "cache encoded by it would not be the run's latent space; set cache.vae to the VAE run it was trained with")


def pin_and_check(stage: str, cfg: dict, run_dir: Path | None, ckpt: Path | None) -> list[Input]:
    """Pin the config's inputs (in place); on a resume, refuse another objective, recipe or input. The inputs."""
    pin_paths(cfg)
    inputs = identify_all(cfg)
    if run_dir is not None:
        saved = run_config(run_dir)
        check_recipe(saved, cfg, run_dir)
        check_inputs(inputs, run_dir)
        if ckpt is not None:
            check_cache_vae(inputs, ckpt, run_dir)
    return inputs


def cache_entry(cfg: Mapping) -> dict | None:
    """The latent cache a config trains on: its folder, identity, VAE and count (from its ``meta.json``)."""
    cache_dir = _get(cfg, "cache.dir")
    meta_path = Path(cache_dir) / META_FILE if cache_dir else None
    if meta_path is None or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return {"dir": str(Path(cache_dir).resolve()), "identity": meta.get("identity"),
            "vae_hash": (meta.get("vae") or {}).get("hash"), "count": meta.get("count")}


def record_lineage(run_dir: Path, stage: str, cfg: dict) -> bool:
    """Write a run's ``lineage.json`` once: its stage, pinned inputs (with the user's spellings) and latent cache."""
    if read_lineage(run_dir) is not None:
        return False
    record = {"stage": stage, "as_given": dict(cfg.get(LINEAGE_KEY) or {}),
              "inputs": inputs_record(identify_all(cfg)), "latent_cache": cache_entry(cfg)}
    return write_lineage(run_dir, record)
