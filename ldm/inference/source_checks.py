"""Checks of what a sampling or export command loads, each called in one line before anything heavy is built.

- ``check_carried_config``: a file that carries its own config (``scripts/export.py``) against an explicit one;
- ``check_run_vae``: a run whose config names its VAE by a link (``runs/vae/latest``, runs from before runs pinned
  their inputs) against the VAE weights its checkpoint holds: another architecture is refused naming the link, other
  weights of the same shapes are reported once (the run's own weights are used);
- ``lineage_of``: the lineage hashes (``ldm.io.lineage``) an exported file or a generated image carries.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ldm.core.config import ConfigError, instantiate_from_config
from ldm.core.errors import UserError
from ldm.io.checkpoints import METADATA_CONFIG, VAE_PREFIX, file_hash, load_prefixed, read_metadata
from ldm.inference.loaders import vae_node
from ldm.inference.sd import read_model_config
from ldm.io.lineage import lineage_hashes, read_lineage, vae_hash_of, vae_weights, weights_hash
from ldm.io.module_weights import params_on_meta
from ldm.io.runs import RunError, checkpoint_for, resolve_run

log = logging.getLogger(__name__)
METADATA_LINEAGE = "ldm.lineage"  # an exported file's lineage hashes, as JSON
SHOWN_KEYS = 4
_REPORTED: set[tuple[str, str]] = set()  # (run, VAE) pairs whose moved link was reported in this process


def _differences(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in dict.fromkeys([*old, *new]):
            _differences(old.get(key), new.get(key), f"{path}.{key}", out)
    elif old != new:
        out.append(f"{path}: {old!r} in the file, {new!r} in --config")


def check_carried_config(ckpt: str | os.PathLike, config: str | os.PathLike | None) -> None:
    """A file that carries its own config, given another ``--config`` that disagrees with it: refused, naming keys."""
    if config is None or Path(ckpt).suffix != ".safetensors" or not Path(ckpt).is_file():
        return
    text = read_metadata(ckpt).get(METADATA_CONFIG)
    if not text:
        return
    carried, given = read_model_config(yaml.safe_load(text)), read_model_config(str(config))
    found: list[str] = []
    _differences(carried, given, "model", found)
    if found:
        more = f" (and {len(found) - SHOWN_KEYS} more)" if len(found) > SHOWN_KEYS else ""
        raise ConfigError(f"--config {config} disagrees with the config {ckpt} carries: {'; '.join(found[:SHOWN_KEYS])}"
                          f"{more}; drop --config (the file's own config is used)")


def check_run_vae(config: Mapping, ckpt: str | os.PathLike | Mapping, run: str | os.PathLike) -> None:
    """A run's VAE named by path must have the architecture of the VAE weights its checkpoint (a path, or its state
    already loaded) holds; other weights of the same shapes are reported once (sampling and export take the run's
    own weights from its checkpoint)."""
    first_stage = ((config.get("model") or {}).get("params") or {}).get("first_stage")
    if not isinstance(first_stage, (str, os.PathLike)) or not Path(first_stage).exists():
        return
    with params_on_meta():
        named = {k: tuple(v.shape) for k, v in instantiate_from_config(vae_node(first_stage, run)).state_dict().items()}
    state = ckpt if isinstance(ckpt, Mapping) else load_prefixed(ckpt, VAE_PREFIX)
    held = vae_weights({k: v for k, v in state.items() if k.startswith(VAE_PREFIX)})
    if not held:
        return
    shapes = {k: tuple(v.shape) for k, v in held.items()}
    where = f"{resolve_run(first_stage)}" if Path(first_stage).is_dir() else str(Path(first_stage).resolve())
    if set(shapes) != set(named):
        return  # a damaged checkpoint or another kind of file: the strict loader names the keys
    key = next((k for k in shapes if named[k] != shapes[k]), None)
    if key is not None:
        now = f" now names {where}," if where != str(first_stage) else ""
        raise RunError(f"{run}: model.params.first_stage {first_stage}{now} a VAE of another architecture than the one "
                       f"the run was trained with ({key}: {named[key]} there, {shapes[key]} in the run's checkpoint); "
                       "point first_stage in its config.yaml at the VAE run it was trained with (or restore the link)")
    mark = (str(run), where)
    if mark not in _REPORTED and _named_hash(first_stage) != weights_hash(held):
        _REPORTED.add(mark)
        log.warning("%s: model.params.first_stage %s now names %s, whose weights are not the VAE the run holds; "
                    "using the run's own VAE weights (from its checkpoint)", run, first_stage, where)


def _named_hash(first_stage: str | os.PathLike) -> str | None:
    try:
        return vae_hash_of(checkpoint_for(first_stage))
    except UserError:
        return None


def lineage_of(run: str | os.PathLike | None = None, ckpt: str | os.PathLike | None = None,
               source: Mapping | None = None) -> dict[str, str]:
    """The lineage hashes of a run (its ``lineage.json``) or of a file exported from one (its metadata), plus, from a
    Pipeline's ``source``, the file hashes of its guiding classifier and LoRA files; {} when nothing is known."""
    out: dict[str, str] = {}
    if run is not None:
        try:
            out = lineage_hashes(read_lineage(resolve_run(run)))
        except RunError:
            out = {}
    elif ckpt is not None and Path(ckpt).suffix == ".safetensors" and Path(ckpt).is_file():
        text = read_metadata(ckpt).get(METADATA_LINEAGE)
        out = json.loads(text) if text else {}
    source = source or {}
    if source.get("classifier"):
        out["classifier"] = _file_hash(checkpoint_for(source["classifier"]))
    for lora in source.get("lora") or []:
        out[f"lora:{Path(lora['file']).name}"] = _file_hash(lora["file"])
    return out


def _file_hash(path: str | os.PathLike) -> str:
    stat = Path(path).stat()
    return _hash_once(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _hash_once(path: str, size: int, mtime_ns: int) -> str:
    """A file's hash, read once per (path, size, time) in a process (a batch of images shares it)."""
    return file_hash(path)
