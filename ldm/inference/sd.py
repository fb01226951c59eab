"""Stable Diffusion and ControlNet from public checkpoints: build from an inference config, load strictly.

``load_sd(config, ckpt)`` builds the model of ``configs/sd/*.yaml`` (or a config ``scripts/export.py``
wrote) with its parameters on the meta device, so no random weights are ever allocated, then gives each
parameter the file's tensor (moved and cast one at a time, ``load_state_dict(assign=True)``): an 860 M model
costs one copy of its weights. Loading is strict: anything missing, unexpected or of the wrong shape is
named (``ldm.io.checkpoints.fit_report``); what public files legitimately hold beyond the model is listed
in ``ldm.io.checkpoints.IGNORED_KEYS``. SD1's Hugging Face-named CLIP text model is mapped into open_clip's
form (``ldm.io.hf_clip``), the U-Net takes the file's EMA weights when it has them, and a
separate ControlNet (v1.1 files) or VAE file replaces those parts.

The key mapping lives in ``ldm.inference.sd_layout``, ControlNet's additions (``with_control_stage``,
``tool_add_control.py``'s initialisation) in ``ldm.inference.sd_control``, export in ``ldm.inference.export``.
``guess_sd_config`` picks ``configs/sd/*`` for a file that does not name its own config.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import yaml
from safetensors import safe_open
from torch import Tensor, nn

from ldm.core.config import ConfigError, apply_overrides, instantiate_from_config, load_config
from ldm.core.dtypes import resolve_dtype
from ldm.core.migrate import upgrade_config
from ldm.core.paths import config_dir
from ldm.inference.loaders import vae_node
from ldm.inference.sd_control import with_control_stage
from ldm.inference.sd_layout import (
    CONFIG_HINT,
    Component,
    component_state,
    dtype_rule,
    guess_sd_version,
    mismatch_hint,
    refuse_bare,
    to_model_layout,
)
from ldm.io.checkpoints import (
    CONTROL_PREFIX,
    METADATA_CONFIG,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    add_prefix,
    load_file,
    read_metadata,
    state_dict_of,
)
from ldm.io.module_weights import load_assign, load_strict, params_on_meta
from ldm.nets.autoencoder.model import downsampling_factor
from ldm.systems.latent_diffusion import LatentDiffusion

SD_CONFIG_DIR = config_dir() / "sd"
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (inner, context_dim)
SD1_CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024
SD1_CONFIG = "v1-inference.yaml"  # a ControlNet (file or --controlnet) turns it into a ControlLDM when loading
SDXL_CONFIG = "xl-base-inference.yaml"
SDXL_BASE_KEY = "conditioner.embedders.1.model.text_projection"  # SDXL base's second (bigG) text tower
SD1_INPAINTING_CONFIG = "v1-inpainting-inference.yaml"
INPUT_KEY = UNET_PREFIX + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
INPAINTING_IN_CHANNELS = 9  # noisy latents, mask, masked-image latents


# ---------------------------------------------------------------------------------------------- configs


def read_model_config(config: str | os.PathLike | dict | None, ckpt_path: str | os.PathLike | None = None,
                      overrides: Sequence[str] = ()) -> dict:
    """The ``model`` node of an inference config: a YAML file, a loaded config dict, or (None) the config a
    `.safetensors` file written by scripts/export.py carries in its metadata; ``overrides`` apply to each alike."""
    if config is None:
        text = read_metadata(ckpt_path).get(METADATA_CONFIG) if ckpt_path is not None else None
        if not text:
            raise ConfigError(f"{ckpt_path} carries no config: give one (--config), e.g. one of "
                              f"{', '.join(sorted(p.name for p in SD_CONFIG_DIR.glob('*.yaml')))} in configs/sd/")
        where = f"the config in {ckpt_path}"
        cfg = upgrade_config(apply_overrides(yaml.safe_load(text), overrides, where), where)
    elif isinstance(config, Mapping):
        cfg = upgrade_config(apply_overrides(copy.deepcopy(dict(config)), overrides, "the config given"))
    else:
        cfg = load_config(config, overrides)
    if "model" not in cfg:
        raise ConfigError(f"{config or ckpt_path}: the config has no `model:` section")
    return inference_node(cfg["model"])


def inference_node(node: dict) -> dict:
    """A model node ready to load weights into: ``first_stage`` as an AutoencoderKL node (a stage-1 run named
    by path is replaced by its architecture), no EMA copy (load_sd puts the file's EMA in the U-Net)."""
    node = copy.deepcopy(node)
    params = node.setdefault("params", {})
    first_stage = params.get("first_stage")
    if first_stage is None:
        raise ConfigError("model.params.first_stage is empty: an inference config needs the VAE "
                          "(an AutoencoderKL node)")
    params["first_stage"] = vae_node(first_stage)  # a stage-1 run named by path → its architecture
    params["ema"] = None
    return node


def build_sd(config: str | os.PathLike | dict, overrides: Sequence[str] = (), on_meta: bool = False,
             control: bool = False) -> LatentDiffusion:
    """The model of an inference config, random weights (or none: ``on_meta`` puts parameters on the meta
    device); ``control`` adds a ControlNet shaped like the U-Net when the config has none."""
    node = read_model_config(config, overrides=overrides)
    node = with_control_stage(node) if control else node
    if on_meta:
        with params_on_meta():
            return instantiate_from_config(node, "model")
    return instantiate_from_config(node, "model")


@dataclass(frozen=True)
class SDSummary:
    """What an SD checkpoint + config draws, read from the config alone (the weights are not touched)."""

    checkpoint: Path
    config: dict  # the model node, as load_sd builds it
    condition_key: str  # "caption" for text models
    downsampling_factor: int  # pixels per latent cell (8 for SD)
    image_size: int  # default pixels per side (512, or 768 for SD 2.x v)
    parameterization: str  # eps | v | x0
    controlnet: Path | None  # a separate ControlNet file, when given


def describe_sd(config_path: str | os.PathLike | dict | None, ckpt_path: str | os.PathLike,
                controlnet: str | os.PathLike | None = None) -> SDSummary:
    """Check that the files exist and the config is sound, and summarise what ``load_sd`` would build (cheap)."""
    for path in (ckpt_path, controlnet):
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"checkpoint not found: {path}")
    node = read_model_config(config_path, ckpt_path)
    params = node["params"]
    cond = params.get("cond_stage") or {}
    ddconfig = (params["first_stage"].get("params") or {}).get("ddconfig") or {}
    return SDSummary(Path(ckpt_path), node, (cond.get("params") or {}).get("key", "caption"),
                     downsampling_factor(ddconfig), int(params.get("image_size") or 0),
                     ((params.get("objective") or {}).get("params") or {}).get("parameterization", "eps"),
                     Path(controlnet) if controlnet else None)


# ---------------------------------------------------------------------------------------------- loading


def load_component(module: nn.Module, path: str | os.PathLike, component: Component, unsafe: bool = False,
                   use_ema: bool = True) -> None:
    """Load a U-Net, VAE or ControlNet from a bare component file (e.g. vae-ft-mse-840000-ema-pruned) or
    from that part of a full checkpoint, strictly, into an existing (real) module."""
    state = state_dict_of(load_file(path, unsafe, mmap=True))
    names = [n for n, _ in module.named_parameters()] if component == "unet" else ()
    load_strict(module, component_state(state, component, str(path), names, use_ema), f"{component} weights in {path}")


def load_sd(config_path: str | os.PathLike | dict | None, ckpt_path: str | os.PathLike,
            device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, use_ema: bool = True,
            unsafe: bool = False, controlnet: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
            overrides: Sequence[str] = ()) -> LatentDiffusion:
    """A Stable Diffusion model (a ControlLDM with ``controlnet`` or a ControlNet config) with a checkpoint's weights.

    ``config_path``: configs/sd/*.yaml (or None for a file scripts/export.py wrote). ``dtype`` (None: fp32)
    applies to the U-Net, VAE and ControlNet; the text encoder stays fp32. The U-Net takes the file's EMA
    weights when it has them unless ``use_ema=False``. ``controlnet`` / ``vae``: separate files (bare, or
    with ``control_model.`` / ``first_stage_model.`` prefixes) replacing those parts. ``unsafe`` allows
    pickles that run code (``--unsafe-load``). Eval mode; ``checkpoint_info`` says what was loaded.
    """
    node = read_model_config(config_path, ckpt_path, overrides)
    state = read_sd_state(ckpt_path, unsafe, controlnet, vae)
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        node = with_control_stage(node)
    with params_on_meta():
        system = instantiate_from_config(node, "model")
    info = load_sd_weights(system, state, device, dtype, use_ema, what=f"checkpoint {ckpt_path}",
                           hint=mismatch_hint(guess_sd_version(state), node), consume=True)
    system.eval()
    system.checkpoint_info = {"checkpoint": str(ckpt_path), "controlnet": str(controlnet) if controlnet else None,
                              "vae": str(vae) if vae else None, **info}
    return system


def read_sd_state(ckpt_path: str | os.PathLike, unsafe: bool = False, controlnet: str | os.PathLike | None = None,
                  vae: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """A full checkpoint's tensors (public layout), with a separate ControlNet's and VAE's put in their place."""
    state = state_dict_of(load_file(ckpt_path, unsafe, mmap=True))
    refuse_bare(state, ckpt_path)
    for path, component, prefix in ((controlnet, "controlnet", CONTROL_PREFIX), (vae, "vae", VAE_PREFIX)):
        if path is not None:
            part = component_state(state_dict_of(load_file(path, unsafe, mmap=True)), component, str(path))
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            state.update(add_prefix(part, prefix))
    return state


def load_sd_weights(system: LatentDiffusion, checkpoint: str | os.PathLike | Mapping[str, Tensor],
                    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                    use_ema: bool = True, unsafe: bool = False, control_from_unet: bool = False,
                    what: str | None = None, hint: str = CONFIG_HINT, consume: bool = False) -> dict:
    """Load a public SD checkpoint (a path or its tensors) into a built system, strictly; returns what was done.

    The system may be built with ``params_on_meta`` (nothing allocated twice) or normally. ``control_from_unet``:
    a ControlLDM whose file has no ``control_model.*`` gets a ControlNet initialised from the U-Net
    (``tool_add_control.py``: encoder copied, fresh hint block, zero convs zero). A system that keeps an EMA
    (``model_ema``) starts it from the loaded U-Net weights when the file has none to give.
    """
    if not isinstance(checkpoint, Mapping):
        what = what or f"checkpoint {checkpoint}"
        checkpoint, consume = read_sd_state(checkpoint, unsafe), True
    state = dict(checkpoint)
    if consume:  # no other reference keeps a file tensor alive once its converted copy exists
        checkpoint.clear()
    state, info = to_model_layout(system, state, use_ema, control_from_unet)
    load_assign(system, state, what or "checkpoint", device, dtype_rule(resolve_dtype(dtype)), hint=hint)
    if device is not None:
        system.to(device)  # the buffers constructors computed (schedule tables, causal masks)
    if torch.isnan(system.scale_factor):
        raise CheckpointError(f"{what}: the file does not store scale_factor and the config does not set it: "
                              "set model.params.scale_factor (0.18215 for SD's VAE)")
    return info


def guess_sd_config(ckpt: str | os.PathLike, unsafe: bool = False) -> Path | None:
    """The configs/sd file for a public checkpoint that does not carry its own config (None when it does).

    SD 1.x is told by its 768-wide cross-attention context. SD 2.x (ε at 512 px or v at 768 px) cannot be
    told apart by its weights, so it, like anything unrecognised, is a ConfigError asking for ``--config``.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors" and read_metadata(path).get(METADATA_CONFIG):
        return None  # exported by scripts/export.py: load_sd reads the config from the file
    context, inputs, xl_tower = _shapes(path, unsafe, (CONTEXT_KEY, INPUT_KEY, SDXL_BASE_KEY))
    if context and context[-1] == SD1_CONTEXT_DIM:
        inpainting = inputs is not None and inputs[1] == INPAINTING_IN_CHANNELS
        return SD_CONFIG_DIR / (SD1_INPAINTING_CONFIG if inpainting else SD1_CONFIG)
    if context is None and xl_tower is not None:  # generative-models' layout, two text towers
        return SD_CONFIG_DIR / SDXL_CONFIG
    context = context[-1] if context else None
    configs = ", ".join(f"configs/sd/{p.name}" for p in sorted(SD_CONFIG_DIR.glob("*.yaml")))
    if context == SD2_CONTEXT_DIM:
        raise ConfigError(f"{path} looks like Stable Diffusion 2.x, whose ε (512 px) and v (768 px) models share "
                          "their layout: give --config configs/sd/v2-inference.yaml or configs/sd/v2-inference-v.yaml")
    raise ConfigError(f"cannot tell which model {path} holds: give --config, e.g. one of {configs}")


def _shapes(path: Path, unsafe: bool, names: Sequence[str]) -> list[list[int] | None]:
    """The shapes of tensors ``names`` in a checkpoint file (None for an absent one)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())  # safe_open is not a container
                return [list(f.get_slice(k).get_shape()) if k in keys else None for k in names]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    state = state_dict_of(load_file(path, unsafe, mmap=True))
    return [list(state[k].shape) if k in state else None for k in names]
