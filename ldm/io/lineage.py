"""What a run is built from: every run or checkpoint its config names, pinned to the exact file, and their identities.

A config names its inputs by paths that move (``runs/vae/latest``) or depend on the working directory
(``runs/ldm/my-run``). ``pin_paths`` rewrites each one (``PINNED``) to the absolute checkpoint it names now and keeps
the user's spelling in the config's ``lineage:`` section; ``identify`` gives each input its identity (the step it
was saved at, the hash of the VAE weights it holds, the hash of the file). A run writes these once, when it starts,
to ``lineage.json`` (``write_lineage`` never rewrites it), so that a resume, an export or a sample can check that
what it loads now is what the run was built from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ldm.core.atomic import write_text_atomic
from ldm.core.errors import UserError
from ldm.io.checkpoints import (
    VAE_PREFIX,
    file_hash,
    load_file,
    load_prefixed,
    state_dict_of,
    strip_prefix,
    tensors_hash,
)
from ldm.io.runs import RunError, checkpoint_for

LINEAGE_FILE = "lineage.json"
LINEAGE_KEY = "lineage"  # the config's section: {config key: the path as the user gave it}
LINEAGE_VERSION = 1
VAE_TRAINING_ONLY = ("loss.",)  # a stage-1 checkpoint's LPIPS and discriminator: not the autoencoder's weights
# Config keys that name a run or a file the run is built from, and the role of what they name.
PINNED: tuple[tuple[str, str], ...] = (
    ("cache.vae", "vae"),
    ("model.params.first_stage", "vae"),
    ("model.params.base", "base"),
    ("model.params.base_ckpt", "base_file"),
    ("model.params.base_config", "base_config"),
    ("cache.vae_config", "vae_config"),
    ("reflow.source", "reflow_source"),
    ("model.params.classifier", "classifier"),
)
RUN_ROLES = ("vae", "base", "reflow_source", "classifier")  # named by a run directory → pinned to its checkpoint
WEIGHT_ROLES = ("vae", "base", "base_file", "reflow_source", "classifier")  # identified by the VAE they hold


@dataclass(frozen=True)
class Input:
    """One thing a run is built from: its role, the config key naming it, as given and pinned, and its identity."""

    role: str
    key: str
    as_given: str
    path: str
    step: int | None = None
    hash: str | None = None  # the file's bytes (SHA-256, first 16 hex digits)
    vae_hash: str | None = None  # the VAE weights it holds (the identity a latent cache records)


def _get(cfg: Mapping, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _set(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def pinned_path(value: str, role: str) -> Path:
    """The exact file a config value names now: a run directory (or ``<stage>/latest``) → its checkpoint's real path."""
    path = Path(value)
    if role in RUN_ROLES and path.is_dir():
        path = checkpoint_for(path)
    return path.resolve()


def named_inputs(cfg: Mapping) -> Iterator[tuple[str, str, str]]:
    """(key, role, value) of every path in ``cfg`` that names a run or file the run is built from."""
    for key, role in PINNED:
        value = _get(cfg, key)
        if isinstance(value, (str, os.PathLike)) and str(value):
            yield key, role, str(value)


def pin_paths(cfg: dict) -> dict[str, str]:
    """Rewrite (in place) every existing path of ``named_inputs`` to the absolute file it names now; the user's
    spellings that changed go to ``cfg['lineage']`` (kept from an earlier pinning). Returns that section."""
    given = dict(cfg.get(LINEAGE_KEY) or {})
    for key, role, value in named_inputs(cfg):
        if not Path(value).exists():
            continue  # not found: the stage's own check names it
        pinned = str(pinned_path(value, role))
        if pinned != value:
            given.setdefault(key, value)
            _set(cfg, key, pinned)
    if given:
        cfg[LINEAGE_KEY] = given
    return given


def vae_weights(state: Mapping) -> dict:
    """The VAE weights a checkpoint's state holds: ``first_stage_model.*`` of a full model, else a stage-1 run's."""
    if any(k.startswith(VAE_PREFIX) for k in state):
        return strip_prefix(state, VAE_PREFIX)
    return {k: v for k, v in state.items() if not k.startswith(VAE_TRAINING_ONLY)}


def read_vae_state(path: str | os.PathLike, public: bool = False) -> dict:
    """The VAE weights a checkpoint holds, unprefixed (``vae_weights``); ``public``: a public SD file (only its
    ``first_stage_model.*`` is read)."""
    if public:
        return strip_prefix(load_prefixed(path, VAE_PREFIX), VAE_PREFIX)
    return vae_weights(state_dict_of(load_file(path, mmap=True)))


_VAE_HASHES: dict[tuple, str] = {}  # (file, inode, size, mtime, public) → VAE hash: each file hashed once a process


def _file_key(path: str | os.PathLike, public: bool) -> tuple:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, public


def vae_hash_of(path: str | os.PathLike, public: bool = False) -> str:
    """The hash of the VAE weights a checkpoint holds (``tensors_hash``, as a latent cache's ``meta.json`` records);
    ``public``: a public SD file. Read once per file (and not at all after ``vae_hash_from`` hashed its weights)."""
    if not Path(path).is_file():
        return weights_hash(read_vae_state(path, public))  # refused by the reader, naming what is there instead
    key = _file_key(path, public)
    if key not in _VAE_HASHES:
        _VAE_HASHES[key] = weights_hash(read_vae_state(path, public))
    return _VAE_HASHES[key]


def vae_hash_from(path: str | os.PathLike, state: Mapping, public: bool = False) -> str:
    """``vae_hash_of(path)`` from the weights ``read_vae_state(path, public)`` returned (the file is not read again)."""
    digest = weights_hash(state)
    _VAE_HASHES[_file_key(path, public)] = digest
    return digest


def weights_hash(state: Mapping) -> str:
    """``tensors_hash`` of weights as a network loads them (fp32), so an fp16 file and its fp32 copy agree."""
    return tensors_hash({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def vae_hash_and_step(path: str | os.PathLike) -> tuple[str, int | None]:
    """The hash of the VAE weights a run's checkpoint holds and the training step it was saved at (None for a plain
    weights file), from one read of the file (the VAE's hash is then known to ``vae_hash_of`` too)."""
    if Path(path).suffix == ".safetensors":
        return vae_hash_of(path), None
    checkpoint = load_file(path, mmap=True)
    step = checkpoint.get("global_step")
    return vae_hash_from(path, vae_weights(state_dict_of(checkpoint))), int(step) if step is not None else None


_IDENTITIES: dict[tuple, tuple] = {}  # (path, size, mtime, role) → (step, file hash, VAE hash): each file read once


def identify(key: str, role: str, as_given: str, path: str | os.PathLike, public_vae: bool = False) -> Input:
    """The identity of one input: step, file hash and (for what holds weights) the hash of its VAE."""
    path = Path(path)
    if not path.is_file():
        return Input(role, key, as_given, str(path))
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns, role, public_vae)
    if memo not in _IDENTITIES:
        step = vae = None
        if role in WEIGHT_ROLES:
            try:
                if public_vae or role == "base_file":  # a public file: its VAE, no training step
                    vae = vae_hash_of(path, public=True)
                else:
                    vae, step = vae_hash_and_step(path)
            except UserError:
                pass  # a file this stage cannot read as it is (e.g. pickled): its bytes still identify it
        _IDENTITIES[memo] = (step, file_hash(path), vae)
    return Input(role, key, as_given, str(path), *_IDENTITIES[memo])


def identify_all(cfg: Mapping) -> list[Input]:
    """The identity of every (pinned) input of ``cfg``, with the user's spelling from its ``lineage:`` section."""
    given = cfg.get(LINEAGE_KEY) or {}
    public_vae = bool(_get(cfg, "cache.vae_config"))
    out = []
    for key, role, value in named_inputs(cfg):
        try:
            out.append(identify(key, role, given.get(key, value), value, public_vae and key == "cache.vae"))
        except RunError:
            continue  # a run without a checkpoint yet: the stage's own check names it
    return out


def lineage_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its lineage record."""
    return Path(run_dir) / LINEAGE_FILE


def write_lineage(run_dir: str | os.PathLike, record: Mapping) -> bool:
    """Write ``lineage.json`` once (atomically); a record already there is never rewritten. True when written."""
    path = lineage_path(run_dir)
    if path.is_file():
        return False
    write_text_atomic(path, json.dumps({"version": LINEAGE_VERSION, **record}, indent=1))
    return True


def read_lineage(run_dir: str | os.PathLike) -> dict | None:
    """A run's lineage record, or None for a run started before runs kept one."""
    path = lineage_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def inputs_record(inputs: list[Input]) -> list[dict]:
    """The inputs as JSON-ready dicts."""
    return [asdict(i) for i in inputs]


def lineage_hashes(record: Mapping | None) -> dict[str, str]:
    """``{role: hash}`` of a lineage record (the VAE by its weights, the rest by their files; the latent cache by
    its identity), for metadata that travels with an exported file or an image."""
    out: dict[str, str] = {}
    for entry in (record or {}).get("inputs", []):
        value = entry.get("vae_hash") if entry.get("role") == "vae" else entry.get("hash")
        if value:
            out.setdefault(entry["role"], value)
    cache = (record or {}).get("latent_cache") or {}
    if cache.get("identity"):
        out["latent_cache"] = cache["identity"]
    return out
