"""Checkpoint files: safe loading (safetensors, or torch's weights-only unpickler), atomic saving,
strict key reports, and content hashes."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ldm.errors import UserError

UNSAFE_FLAG = "--unsafe-load"
HASH_CHUNK = 2**20
REPORT_MAX_KEYS = 8


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


def load_file(path: str | os.PathLike, unsafe: bool = False) -> dict:
    """Read a `.safetensors`, `.ckpt`, `.pt` or `.pth` file onto the CPU without running code from it.

    Pickled files go through ``torch.load(weights_only=True)``; one that needs full unpickling is
    refused unless ``unsafe`` is set (the CLI's ``--unsafe-load``), which a user must choose knowingly.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects beyond tensors and plain containers, and loading it would run code "
            f"from the file. It was refused. If you trust its source, pass {UNSAFE_FLAG}; better, convert it "
            f"to .safetensors. (torch: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e


def state_dict_of(checkpoint: Mapping) -> dict:
    """The tensor mapping inside a checkpoint (Lightning's or SD's ``state_dict``, or the file itself)."""
    inner = checkpoint.get("state_dict", checkpoint)
    return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """The entries under ``prefix`` (e.g. ``first_stage_model.``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                ignore: Iterable[str] = ()) -> None:
    """Load every parameter and buffer of ``module`` or raise a report of what does not fit.

    ``ignore`` lists key prefixes of the file that are expected and skipped (e.g. ``loss.``).
    """
    ignore = tuple(ignore)
    state_dict = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:REPORT_MAX_KEYS]) + (f", … ({len(keys)} in all)" if len(keys) > REPORT_MAX_KEYS else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model — " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a `.safetensors` file via a temporary file and rename, so a kill never corrupts it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    fsync_replace(tmp, path)
    return path


def fsync_replace(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and atomically rename it over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tensors_hash(tensors: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and bytes: identifies weights whatever file holds them."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:length]


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of a file's bytes (hex, first ``length`` characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
