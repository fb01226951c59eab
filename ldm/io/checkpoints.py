"""Checkpoint files: safe loading (safetensors, or torch's weights-only unpickler), atomic saving,
strict key reports, content hashes, and the public Stable Diffusion / ControlNet key layout. Giving a built module
these tensors (by copy, or assigned into a module built without weights): ``ldm.io.module_weights``.

The public layout (CompVis latent-diffusion, Stability's stablediffusion, lllyasviel's ControlNet) puts the
U-Net under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoder under
``cond_stage_model.``, a ControlNet under ``control_model.`` and LitEma's shadow weights under ``model_ema.``
(parameter names without dots). ``checkpoint_kind`` tells a full checkpoint from a bare component file
(a U-Net, a VAE, a ControlNet alone) and refuses the diffusers layout by name. ``IGNORED_KEYS`` lists,
in one place, what public files hold that is legitimately not loaded, and ``FILLED_KEYS`` what they may
lack that the config provides.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ldm.core.atomic import write_atomic
from ldm.core.errors import UserError
from ldm.io.safe_pickle import torch_load

UNSAFE_FLAG = "--unsafe-load"
# safetensors metadata entries of files scripts/export.py writes (names kept since the first release)
METADATA_CONFIG = "ldm.config"  # the inference config, as YAML
METADATA_SOURCE = "ldm.source"  # the checkpoint it was exported from
METADATA_EMA = "ldm.ema"  # keep | only | drop
HASH_CHUNK = 2**20
REPORT_MAX_KEYS = 8

# ------------------------------------------------------------------------------ the public key layout
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CONTROL_PREFIX = "control_model."
EMA_PREFIX = "model_ema."
# A system's EMA module → the module whose parameters it shadows (LitEma keys: ``<ema>.<name without dots>``).
EMA_SHADOWED = {"model_ema": "model", "control_ema": "control_model"}
HF_TEXT_PREFIX = "cond_stage_model.transformer."  # SD1: a transformers CLIPTextModel
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."  # SD2 (and this project's FrozenOpenCLIP)

# What public checkpoints hold that is legitimately NOT loaded, all in one place:
IGNORED_KEYS = frozenset({
    # latent-diffusion's DDPM schedule buffers. This project derives its NoiseSchedule from the config
    # (non-persistent buffers); load_sd compares a file's `alphas_cumprod` with the config's and warns.
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    # the loss's per-timestep log-variance (training only; files trained with learn_logvar carry it)
    "logvar",
    # LitEma's bookkeeping: sampling takes the shadow weights, not the decay state
    "model_ema.decay", "model_ema.num_updates",
    # transformers' position-id buffer (arange(77), persistent in old versions), with and without `text_model.`
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
    # open_clip's causal attention mask (derived from the context length; persistent in some old versions)
    "cond_stage_model.model.attn_mask",
})
# Training-only weights that bare VAE files (latent-diffusion's kl-f8, some fine-tunes) still carry:
# LPIPS and the PatchGAN discriminator of the VAE's loss.
IGNORED_PREFIXES = ("loss.", "first_stage_model.loss.")
# Keys a model built from configs/sd/* has that public files may lack; they are taken from the config
# (or a fixed value) instead, and reported as filled.
FILLED_KEYS = {
    "scale_factor": "the config's scale_factor (SD files store it only when trained with scale_by_std)",
    "image_size": "the config's image_size (this project's record of the training resolution)",
    "cond_stage_model.model.text_projection": "CLIP's pooled-embedding projection, absent from SD1's "
                                              "CLIPTextModel and unused for the cross-attention context",
    "cond_stage_model.model.logit_scale": "CLIP's temperature, absent from SD1's CLIPTextModel and unused",
    "cond_stage_model.embedders.0.model.text_projection": "CLIP's pooled-embedding projection, absent from SDXL's "
                                                          "CLIPTextModel (embedder 0) and unused",
    "cond_stage_model.embedders.0.model.logit_scale": "CLIP's temperature, absent from SDXL's CLIPTextModel and unused",
    "model_ema.decay": "a training system's own EMA settings (the file's are ignored above)",
    "model_ema.num_updates": "a training system's own EMA step count, restarting with the fine-tune",
}
# Substrings that only diffusers' layout has (its U-Net, VAE, ControlNet and pipeline folders).
DIFFUSERS_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_norm_out.",
                     "controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
DIFFUSERS_FOLDER_FILES = ("model_index.json", "unet", "diffusion_pytorch_model.safetensors",
                          "diffusion_pytorch_model.bin", "config.json")
# Root-level names of bare component files.
BARE_UNET = ("input_blocks.", "middle_block.", "output_blocks.")
BARE_CONTROLNET = ("input_hint_block.", "zero_convs.", "middle_block_out.")
BARE_VAE = ("encoder.conv_in.", "decoder.conv_out.")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


def load_file(path: str | os.PathLike, unsafe: bool = False, mmap: bool = False) -> dict:
    """Read a `.safetensors`, `.ckpt`, `.pt` or `.pth` file onto the CPU without running code from it.

    Pickled files go through ``torch.load(weights_only=True)``; one that needs full unpickling is
    refused unless ``unsafe`` is set (the CLI's ``--unsafe-load``), which a user must choose knowingly.
    ``mmap`` maps a pickled file's tensors instead of reading them (pages come in as they are used, so a
    7 GB file with EMA copies does not occupy 7 GB of memory); old non-zip pickles are read as usual.
    """
    path = Path(path)
    if path.is_dir():
        found = [name for name in DIFFUSERS_FOLDER_FILES if (path / name).exists()]
        kind = f"a diffusers model folder (it holds {', '.join(found)})" if found else "a folder"
        raise CheckpointError(f"{path} is {kind}, not a checkpoint file. {DIFFUSERS_HINT}" if found
                              else f"{path} is a folder; name the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        try:
            return torch_load(path, unsafe, mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            return torch_load(path, unsafe, mmap=False)  # a legacy (non-zip) pickle cannot be mapped
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects beyond tensors and plain containers, and loading it would run code "
            f"from the file. It was refused. If you trust its source, pass {UNSAFE_FLAG}; better, convert it "
            f"to .safetensors. (torch: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e


def load_prefixed(path: str | os.PathLike, prefix: str, unsafe: bool = False) -> dict:
    """The tensors of a checkpoint whose keys start with ``prefix`` (prefix kept); a `.safetensors` file is read
    only there, so a 4 GB SD file costs the VAE's 335 MB when ``prefix`` is ``first_stage_model.``."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return {k: v for k, v in state_dict_of(load_file(path, unsafe, mmap=True)).items() if k.startswith(prefix)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a `.safetensors` file (empty for other files or none)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def state_dict_of(checkpoint: Mapping) -> dict:
    """The tensor mapping inside a checkpoint (Lightning's or SD's ``state_dict``, or the file itself)."""
    inner = checkpoint.get("state_dict", checkpoint)
    return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """The entries under ``prefix`` (e.g. ``first_stage_model.``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """Every entry with ``prefix`` put in front of its key."""
    return {prefix + k: v for k, v in state_dict.items()}


def fit_report(own: Mapping[str, torch.Size | tuple], state_dict: Mapping[str, torch.Tensor], what: str,
               hint: str = "") -> None:
    """Raise a CheckpointError naming missing, unexpected and wrongly shaped keys (``own``: key → shape)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k])}"
        for k in set(own) & set(state_dict)
        if tuple(own[k]) != tuple(state_dict[k].shape)
    )
    problems = key_listing((("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)))
    if problems:
        raise CheckpointError(f"{what} does not fit the model — {problems}" + (f". {hint}" if hint else ""))


def key_listing(groups: Iterable[tuple[str, list[str]]]) -> str:
    """``label: a, b, … (n in all); label: …`` for the non-empty groups, at most REPORT_MAX_KEYS names each."""
    parts = []
    for label, keys in groups:
        if keys:
            more = f", … ({len(keys)} in all)" if len(keys) > REPORT_MAX_KEYS else ""
            parts.append(f"{label}: {', '.join(keys[:REPORT_MAX_KEYS])}{more}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ public layout helpers

DIFFUSERS_HINT = ("Files in diffusers' layout (down_blocks / mid_block / up_blocks names, or a model folder with "
                  "model_index.json) are out of scope: this project reads the original CompVis / Stability / "
                  "ControlNet layout. Use the original single-file release (e.g. v1-5-pruned-emaonly.safetensors), "
                  "or convert with diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py.")


def checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"full"`` (SD-prefixed components), ``"controlnet"``, ``"unet"``, ``"vae"``, ``"text"`` (a bare
    CLIP text model) or ``"unknown"``; a diffusers-layout state dict raises a CheckpointError saying so."""
    keys = list(state_dict)
    diffusers = [k for k in keys if any(m in k for m in DIFFUSERS_MARKERS)]
    if diffusers:
        raise CheckpointError(f"the file is in diffusers' layout (e.g. {diffusers[0]!r}). {DIFFUSERS_HINT}")
    if any(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) for k in keys):
        return "full"
    if any(k.startswith(CONTROL_PREFIX) or k.startswith(BARE_CONTROLNET) for k in keys):
        return "controlnet"
    if any(k.startswith(BARE_UNET) for k in keys):
        return "unet"
    if any(k.startswith(BARE_VAE) for k in keys):
        return "vae"
    if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in keys):
        return "text"
    return "unknown"


def drop_ignored(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(the entries not in IGNORED_KEYS / IGNORED_PREFIXES, the sorted names of those dropped)."""
    kept, dropped = {}, []
    for k, v in state_dict.items():
        if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, sorted(dropped)


def ema_shadow_key(key: str, wrapper_prefix: str = "model.") -> str:
    """LitEma's key for a parameter: ``model.diffusion_model.input_blocks.0.0.weight`` →
    ``model_ema.diffusion_modelinput_blocks00weight`` (the name under the tracked wrapper, dots removed)."""
    if not key.startswith(wrapper_prefix):
        raise ValueError(f"{key!r} is not under the EMA-tracked module {wrapper_prefix!r}")
    return EMA_PREFIX + shadow_name(key[len(wrapper_prefix):])


def shadow_name(param_name: str) -> str:
    """The buffer name of a parameter's EMA shadow: its name without dots (buffer names cannot hold them)."""
    return param_name.replace(".", "")


def has_ema(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict holds LitEma shadow weights (not only its decay / count)."""
    return any(k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS for k in state_dict)


def select_ema(state_dict: Mapping[str, torch.Tensor], param_keys: Iterable[str], use_ema: bool) -> tuple[dict, bool]:
    """Put the EMA weights (``model_ema.*``) in place of the parameters ``param_keys`` when asked and present.

    Returns (state dict without ``model_ema.*`` entries, whether EMA weights were used). A file whose EMA
    covers only part of the parameters, or holds shadows of parameters the model lacks, is refused.
    """
    state = dict(state_dict)
    shadows = {k: state.pop(k) for k in [k for k in state if k.startswith(EMA_PREFIX)]}
    if not use_ema or not has_ema(shadows):
        return state, False
    wanted = {}
    for key in param_keys:
        shadow = ema_shadow_key(key)
        if shadow in wanted.values():
            raise CheckpointError(f"EMA names collide: two parameters map to {shadow}")
        wanted[key] = shadow
    missing = sorted(f"{s} (for {k})" for k, s in wanted.items() if s not in shadows)
    unexpected = sorted(set(shadows) - set(wanted.values()) - IGNORED_KEYS)
    if missing or unexpected:
        raise CheckpointError("the EMA weights (model_ema.*) do not match the U-Net — "
                              + key_listing((("missing", missing), ("unexpected", unexpected)))
                              + ". Load the raw weights instead (use_ema=False / --no-ema).")
    for key, shadow in wanted.items():
        state[key] = shadows[shadow]
    return state, True


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a `.safetensors` file atomically (``ldm.core.atomic``), so a kill never corrupts it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_safetensors(tensors, str(tmp), metadata=metadata))


def save_torch_atomic(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (Lightning checkpoints)."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def tensors_hash(tensors: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and bytes: identifies weights whatever file holds them."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return digest.hexdigest()[:length]


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of a file's bytes (hex, first ``length`` characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
