"""Where a Pipeline's weights come from: a stage-2 or ControlNet run, or a public Stable Diffusion file.

``describe_run`` / ``describe_checkpoint`` check a source cheaply (configs only, nothing heavy built) so a
command line can refuse bad arguments before loading; ``load_run_system`` / ``load_checkpoint_system``
build the model and load its weights strictly. ``guess_sd_config`` picks ``configs/sd/*`` for a file that
does not name its own config.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ldm.checkpoints import (
    UNET_PREFIX,
    CheckpointError,
    load_file,
    load_strict,
    read_metadata,
    state_dict_of,
)
from ldm.config import ConfigError, get_obj_from_str, instantiate_from_config
from ldm.errors import UserError
from ldm.runs import RunError, checkpoint_for, resolve_run, run_config

DEFAULT_RUN = "runs/ldm/latest"
STAGE2_TARGET = "ldm.systems.latent_diffusion.LatentDiffusion"
CONTROL_TARGET = "ldm.sd_control.ControlLDM"  # ControlNet systems (stage 3's trainable one included) subclass it
CONTROL_STAGE_PARAM = "control_stage"
EMA_TARGETS = {"model_ema": "model", "control_ema": "control_model"}  # a system's EMA → the module it shadows
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SD_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sd"
METADATA_CONFIG = "ldm.config"  # the safetensors metadata entry where scripts/export.py stores the config
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (inner, context_dim)
SD1_CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024
SD1_CONFIG = "v1-inference.yaml"  # a ControlNet (file or --controlnet) turns it into a ControlLDM when loading


class PipelineError(UserError, ValueError):
    """A request the pipeline cannot draw: bad size, steps, guidance, sampler, conditions or control image."""


class NotAnLDMRunError(PipelineError):
    """A run directory that holds no stage-2 (latent diffusion) model, e.g. a VAE run."""


@dataclass(frozen=True)
class RunSummary:
    """What a stage-2 (or ControlNet) run draws, read from its config alone (nothing heavy is built)."""

    run_dir: Path
    checkpoint: Path
    config: dict
    condition_key: str  # "caption" (text run) or "label" (class run)
    n_classes: int | None
    first_stage: str | dict  # the VAE run (stage 2), or its model node (a ControlNet on an SD file)
    downsampling_factor: int | None  # from the VAE run's config, when it says
    controlnet: bool = False  # a ControlNet run: sampling needs a control image


def describe_run(run: str | os.PathLike = DEFAULT_RUN) -> RunSummary:
    """Check that ``run`` (a run directory, ``runs/ldm/latest`` or a .ckpt inside one) is a stage-2 run; summarise it."""
    run_dir = resolve_run(run)
    cfg = run_config(run_dir)
    node = cfg.get("model") or {}
    target = node.get("target", "")
    if not isinstance(target, str) or not is_subclass(target, STAGE2_TARGET):
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
    control = is_subclass(target, CONTROL_TARGET) or CONTROL_STAGE_PARAM in params
    first_stage = first_stage if isinstance(first_stage, Mapping) else str(first_stage)
    return RunSummary(run_dir, checkpoint_for(run), cfg, key, n_classes, first_stage,
                      _vae_factor(vae_config(first_stage, run)), control)


def is_subclass(target: str, base: str | type) -> bool:
    """Whether the config target ``target`` names a subclass of ``base`` (a class or its dotted name)."""
    try:
        cls = get_obj_from_str(target)
        base = get_obj_from_str(base) if isinstance(base, str) else base
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


def vae_config(first_stage: str | Mapping, run: str | os.PathLike) -> dict:
    """The VAE's model node (architecture only: its weights come from the run's checkpoint), from its run or as given."""
    if isinstance(first_stage, Mapping):
        return dict(first_stage)
    try:
        return run_config(first_stage)["model"]
    except RunError as e:
        raise RunError(f"the VAE run {first_stage} that {run} was trained with (model.params.first_stage) is gone "
                       f"({e}); restore its folder (its config.yaml is enough)") from e


def _vae_factor(node: dict) -> int | None:
    """f = 2^(len(ch_mult) − 1), as AutoencoderKL.downsampling_factor, when the config names ch_mult."""
    ch_mult = ((node.get("params") or {}).get("ddconfig") or {}).get("ch_mult")
    return 2 ** (len(ch_mult) - 1) if ch_mult else None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name ("fp32", "bf16", "fp16"), a dtype, None (fp32) or "auto" (bf16 on CUDA, else fp32)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PipelineError(f"dtype {dtype} is not supported; choose float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; choose one of auto, fp32, bf16, fp16")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run_system(info: RunSummary, use_ema: bool = True) -> tuple[nn.Module, bool]:
    """Build a run's system (a LatentDiffusion or ControlLDM) and load its checkpoint strictly; (system, EMA used).

    The VAE's architecture comes from its run's config; all weights (VAE included) from the run's checkpoint.
    With ``use_ema`` the U-Net (and a ControlNet) take the EMA weights when the run kept them.
    """
    system = instantiate_from_config(info.config["model"], "model", first_stage=None)
    vae_node = vae_config(info.first_stage, info.run_dir)
    system.first_stage_model = instantiate_from_config(
        {"target": vae_node["target"], "params": {**(vae_node.get("params") or {}), "loss": None}}, "first_stage")
    system.first_stage_spec = info.first_stage
    load_strict(system, state_dict_of(load_file(info.checkpoint)), f"checkpoint {info.checkpoint}")
    emas = {name: target for name, target in EMA_TARGETS.items() if getattr(system, name, None) is not None}
    if use_ema:
        for name, target in emas.items():
            getattr(system, name).copy_to(getattr(system, target))
    return system, use_ema and bool(emas)


# ---------------------------------------------------------------------------------------------- SD files


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
    context = _context_dim(path, unsafe)
    if context == SD1_CONTEXT_DIM:
        return SD_CONFIG_DIR / SD1_CONFIG
    configs = ", ".join(f"configs/sd/{p.name}" for p in sorted(SD_CONFIG_DIR.glob("*.yaml")))
    if context == SD2_CONTEXT_DIM:
        raise ConfigError(f"{path} looks like Stable Diffusion 2.x, whose ε (512 px) and v (768 px) models share "
                          "their layout: give --config configs/sd/v2-inference.yaml or configs/sd/v2-inference-v.yaml")
    raise ConfigError(f"cannot tell which model {path} holds: give --config, e.g. one of {configs}")


def _context_dim(path: Path, unsafe: bool) -> int | None:
    """The U-Net's cross-attention context width in a checkpoint file (None when the key is absent)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())  # safe_open is not a container
                return f.get_slice(CONTEXT_KEY).get_shape()[-1] if CONTEXT_KEY in keys else None
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    state = state_dict_of(load_file(path, unsafe, mmap=True))
    tensor = state.get(CONTEXT_KEY)
    return int(tensor.shape[-1]) if tensor is not None else None
