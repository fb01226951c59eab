"""Find and read open_clip weights: a local file or folder, the Hugging Face cache, or a download.

Offline and absent, the error names the arch and tag, says the machine has no network, and how to
provide the file (``pretrained: /path/to/open_clip_pytorch_model.bin`` or a copied Hugging Face cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import download_pretrained

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# Key prefixes a text tower's weights may carry: DataParallel, an SD checkpoint, open_clip's CustomTextCLIP.
STRIP_PREFIXES = ("module.", "cond_stage_model.model.", "text.")
SD_PREFIX = "cond_stage_model.model."
# Entries of a CLIP checkpoint that are not text-tower weights.
IGNORED_KEYS = frozenset({"logit_bias", "attn_mask", "input_resolution", "context_length", "vocab_size"})
ERROR_CHARS = 300  # how much of the underlying download error the message quotes


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that can be neither found locally nor downloaded."""


def resolve_pretrained(arch: str, pretrained: str) -> str:
    """A local weights file for ``pretrained`` (a file, a folder holding one, or an open_clip tag)."""
    if os.path.isfile(pretrained):
        return pretrained
    if os.path.isdir(pretrained):
        found = sorted(p for p in Path(pretrained).iterdir() if p.suffix in WEIGHT_SUFFIXES)
        preferred = [p for p in found if p.name in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)]
        if preferred or found:
            return str((preferred or found)[0])
        raise FileNotFoundError(f"pretrained folder {pretrained} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise FileNotFoundError(
            f"pretrained {pretrained!r} is neither an existing file nor an open_clip tag for arch {arch!r} "
            f"(tags: {tags})"
        )
    cached = _cached_hub_file(cfg)
    if cached:
        return cached
    try:
        path = download_pretrained(cfg)
    except Exception as e:  # hub / urllib errors differ by version; all mean "not here, not reachable"
        raise WeightsUnavailableError(_unavailable_message(arch, pretrained, cfg, e)) from e
    if not path:
        raise WeightsUnavailableError(_unavailable_message(arch, pretrained, cfg, None))
    return path


def _hub_file(cfg: dict) -> tuple[str, str] | None:
    """(repo id, filename) of a tag's weights on the Hugging Face hub, if it lives there."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub)
    return repo, filename or HF_WEIGHTS_NAME


def _cached_hub_file(cfg: dict) -> str | None:
    """The tag's weights from the local Hugging Face cache, without touching the network."""
    hub = _hub_file(cfg)
    if hub is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = hub
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for name in candidates:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _unavailable_message(arch: str, tag: str, cfg: dict, error: Exception | None) -> str:
    hub = _hub_file(cfg)
    if hub is not None:
        source = f"the Hugging Face hub ({hub[0]}, file {hub[1]})"
        fetch = f"`huggingface-cli download {hub[0]} {hub[1]}`"
        filename = hub[1]
    else:
        source = cfg.get("url", "its URL")
        fetch = f"download {source}"
        filename = os.path.basename(source)
    reason = f" ({type(error).__name__}: {str(error).splitlines()[0][:ERROR_CHARS]})" if error else ""
    return (
        f"cannot get the open_clip weights for arch {arch!r}, pretrained tag {tag!r}: downloading them from "
        f"{source} failed{reason}. This machine appears to have no network access (offline, or the hub is "
        f"unreachable). Provide the file locally: on a machine with network run {fetch}, then either set "
        f"`pretrained: /path/to/{filename}` in the config, or copy the Hugging Face cache "
        f"(~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME) to this machine; HF_HUB_OFFLINE=1 skips the "
        f"network retries. `pretrained: null` builds random weights (tests only)."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, a (weights-only) torch pickle, or a TorchScript archive."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as pickle_error:
        try:  # OpenAI's CLIP files are TorchScript archives
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise pickle_error from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


def text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-tower entries of a CLIP / SD checkpoint, keyed as open_clip's ``CLIP`` names them."""
    if any(k.startswith(SD_PREFIX) for k in state):  # a full Stable Diffusion checkpoint
        state = {k: v for k, v in state.items() if k.startswith(SD_PREFIX)}
    out = {}
    for key, value in state.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("visual.") or key in IGNORED_KEYS:
            continue
        out[key] = value
    return out
