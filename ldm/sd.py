"""Stable Diffusion and ControlNet from public checkpoints: build from an inference config, load strictly.

``load_sd(config, ckpt)`` builds the model of ``configs/sd/*.yaml`` (or a config ``scripts/export.py``
wrote) with its parameters on the meta device, so no random weights are ever allocated, then gives each
parameter the file's tensor (moved and cast one at a time, ``load_state_dict(assign=True)``): an 860 M model
costs one copy of its weights. Loading is strict: anything missing, unexpected or of the wrong shape is
named (``ldm.checkpoints.fit_report``); what public files legitimately hold beyond the model is listed
in ``ldm.checkpoints.IGNORED_KEYS``. SD1's Hugging Face-named CLIP text model is mapped into open_clip's
form (``ldm.conditioning.hf_clip``), the U-Net takes the file's EMA weights when it has them, and a
separate ControlNet (v1.1 files) or VAE file replaces those parts.

``ControlLDM``, ``controlnet_from_sd`` (ControlNet's ``tool_add_control.py``), ``sampling_model`` and
``load_control_image`` live in ``ldm.sd_control`` and are importable from here; export to the public layout
lives in ``ldm.sd_export``.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
import yaml
from torch import Tensor, nn

from ldm.checkpoints import (
    CONTROL_PREFIX,
    EMA_PREFIX,
    FILLED_KEYS,
    HF_TEXT_PREFIX,
    OPENCLIP_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    add_prefix,
    checkpoint_kind,
    drop_ignored,
    load_assign,
    load_file,
    load_strict,
    params_on_meta,
    read_metadata,
    select_ema,
    state_dict_of,
    strip_prefix,
)
from ldm.conditioning.hf_clip import ClipKeyError, hf_to_openclip, is_hf_clip_text
from ldm.conditioning.openclip import LOGIT_SCALE_INIT
from ldm.config import ConfigError, instantiate_from_config, load_config
from ldm.ema import FIXED_BUFFERS, LitEma
from ldm.sd_control import (
    ControlLDM,
    ControlledDiffusion,
    control_from_unet_state,
    controlnet_from_sd,
    load_control_image,
    sampling_model,
    with_control_stage,
)
from ldm.systems.latent_diffusion import LatentDiffusion

__all__ = [
    "ControlLDM", "ControlledDiffusion", "SDSummary", "build_sd", "component_state", "controlnet_from_sd",
    "describe_sd", "inference_node", "load_component", "load_control_image", "load_sd", "load_sd_weights",
    "read_model_config", "read_sd_state", "sampling_model", "to_model_layout", "with_control_stage",
]

SD_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sd"
METADATA_CONFIG = "ldm.config"  # safetensors metadata entry holding an exported model's inference config
SCHEDULE_ATOL = 1e-3  # |Δᾱ| above which a file's schedule buffers and the config's disagree (fp16-safe)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CONFIG_HINT = ("Is the config right for this file? SD 1.x files go with configs/sd/v1-inference.yaml, SD 2.x "
               "with configs/sd/v2-inference.yaml (512 px, ε) or v2-inference-v.yaml (768 px, v), ControlNet "
               "v1.0 / v1.1 (SD 1.5) with configs/sd/controlnet-v1.yaml.")
Component = Literal["unet", "vae", "controlnet"]


# ---------------------------------------------------------------------------------------------- systems


# ---------------------------------------------------------------------------------------------- configs


def read_model_config(config: str | os.PathLike | dict | None, ckpt_path: str | os.PathLike | None = None,
                      overrides: Sequence[str] = ()) -> dict:
    """The ``model`` node of an inference config: a YAML file, a loaded config dict, or (None) the config a
    `.safetensors` file written by scripts/export.py carries in its metadata."""
    if config is None:
        text = read_metadata(ckpt_path).get(METADATA_CONFIG) if ckpt_path is not None else None
        if not text:
            raise ConfigError(f"{ckpt_path} carries no config: give one (--config), e.g. one of "
                              f"{', '.join(sorted(p.name for p in SD_CONFIG_DIR.glob('*.yaml')))} in configs/sd/")
        cfg = yaml.safe_load(text)
    elif isinstance(config, Mapping):
        cfg = copy.deepcopy(dict(config))
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
    if isinstance(first_stage, (str, os.PathLike)):
        from ldm.runs import RunError, run_config

        try:
            vae = run_config(first_stage)["model"]
        except RunError as e:
            raise ConfigError(f"model.params.first_stage names the VAE run {first_stage}, which is gone ({e}); "
                              "restore its folder (its config.yaml is enough) or use an exported config") from e
        params["first_stage"] = {"target": vae["target"], "params": {**(vae.get("params") or {}), "loss": None}}
    elif first_stage is None:
        raise ConfigError("model.params.first_stage is empty: an inference config needs the VAE "
                          "(an AutoencoderKL node)")
    if "use_ema" in inspect.signature(LatentDiffusion.__init__).parameters:
        params["use_ema"] = False
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
    ch_mult = ((params["first_stage"].get("params") or {}).get("ddconfig") or {}).get("ch_mult") or ()
    return SDSummary(Path(ckpt_path), node, (cond.get("params") or {}).get("key", "caption"),
                     2 ** (len(ch_mult) - 1) if ch_mult else 1, int(params.get("image_size") or 0),
                     params.get("parameterization", "eps"), Path(controlnet) if controlnet else None)


# ---------------------------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (fp32 / fp16 / bf16), a dtype, or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def component_state(state: Mapping[str, Tensor], component: Component, source: str = "the file",
                    param_keys: Sequence[str] = (), use_ema: bool = True) -> dict:
    """One component's weights with bare keys, from a full checkpoint or a bare component file.

    ``param_keys`` (the U-Net's parameter names, bare) let a full file's EMA weights be chosen for the U-Net.
    Training-only entries (a VAE's ``loss.*``) are dropped.
    """
    kind = checkpoint_kind(state)
    prefix = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "controlnet": CONTROL_PREFIX}[component]
    if component == "controlnet" and kind in ("controlnet", "full"):
        bare = strip_prefix(state, CONTROL_PREFIX) or ({} if kind == "full" else dict(state))
    elif kind == "full":
        if component == "unet":
            state, _ = select_ema(state, [UNET_PREFIX + k for k in param_keys], use_ema and bool(param_keys))
        bare = strip_prefix(state, prefix)
    elif kind == component:
        bare = dict(state)
    else:
        bare = {}
    if not bare:
        raise CheckpointError(f"{source} holds no {component} weights (it looks like a {kind} file: "
                              f"{', '.join(list(state)[:3])}, …)")
    kept, _ = drop_ignored(bare)
    return kept


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
                           hint=_mismatch_hint(guess_sd_version(state), node), consume=True)
    system.eval()
    system.checkpoint_info = {"checkpoint": str(ckpt_path), "controlnet": str(controlnet) if controlnet else None,
                              "vae": str(vae) if vae else None, **info}
    return system


def read_sd_state(ckpt_path: str | os.PathLike, unsafe: bool = False, controlnet: str | os.PathLike | None = None,
                  vae: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """A full checkpoint's tensors (public layout), with a separate ControlNet's and VAE's put in their place."""
    state = state_dict_of(load_file(ckpt_path, unsafe, mmap=True))
    _refuse_bare(state, ckpt_path)
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
    load_assign(system, state, what or "checkpoint", device, _dtype_rule(resolve_dtype(dtype)), hint=hint)
    if device is not None:
        system.to(device)  # the buffers constructors computed (schedule tables, causal masks)
    if torch.isnan(system.scale_factor):
        raise CheckpointError(f"{what}: the file does not store scale_factor and the config does not set it: "
                              "set model.params.scale_factor (0.18215 for SD's VAE)")
    return info


def _refuse_bare(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    kind = checkpoint_kind(state)
    if kind == "full":
        return
    how = {"vae": "pass it as vae= (a VAE replacing the checkpoint's) together with a full SD checkpoint",
           "controlnet": "pass it as controlnet= together with an SD 1.5 checkpoint",
           "unet": "load it into a model's U-Net with ldm.sd.load_component(model.model.diffusion_model, path, 'unet')",
           "text": "it is a CLIP text model alone"}.get(kind, f"its keys begin {', '.join(list(state)[:3])}")
    raise CheckpointError(f"{path} is not a full Stable Diffusion checkpoint but a bare {kind} file: {how}")


def to_model_layout(system: nn.Module, state: Mapping[str, Tensor], use_ema: bool = True,
                    control_from_unet: bool = False) -> tuple[dict, dict]:
    """A public checkpoint's state dict in ``system``'s key layout, and what was done to it.

    Ignored keys are dropped (checking the schedule buffers against the config first), the EMA weights are
    chosen, SD1's HF CLIP keys mapped to open_clip's, and keys the file may lack filled (``FILLED_KEYS``;
    a ControlNet from the U-Net with ``control_from_unet``; a kept EMA from the weights).
    """
    _check_schedule(system, state)
    state, ignored = drop_ignored(state)
    n_ema = sum(k.startswith(EMA_PREFIX) for k in state)
    unet_keys = [UNET_PREFIX + n for n, _ in system.model.diffusion_model.named_parameters()]
    state, ema = select_ema(state, unet_keys, use_ema)
    if n_ema and not ema:
        ignored.append(f"model_ema.* ({n_ema} tensors: use_ema=False)")
    hf = strip_prefix(state, HF_TEXT_PREFIX)  # SD1's CLIPTextModel (not a module that is named `transformer`)
    hf_named = bool(hf) and is_hf_clip_text(hf)
    if hf_named:
        state = {k: v for k, v in state.items() if not k.startswith(HF_TEXT_PREFIX)}
        try:
            state.update(add_prefix(hf_to_openclip(hf), OPENCLIP_TEXT_PREFIX))
        except ClipKeyError as e:
            raise CheckpointError(f"the SD1 text encoder (cond_stage_model.transformer.*) cannot be mapped: {e}") from e
    del hf  # the q / k / v tensors now live concatenated
    own = system.state_dict()
    filled = sorted(k for k in FILLED_KEYS if k in own and k not in state)
    for key in filled:
        state[key] = _fill_value(key, own[key])
    control = getattr(system, "control_model", None)
    if control_from_unet and control is not None and not any(k.startswith(CONTROL_PREFIX) for k in state):
        state.update(control_from_unet_state(control, state))
        filled.append("control_model.* (from the U-Net)")
    for ema_name, source in getattr(system, "ema_sources", {"model_ema": "model."}).items():
        kept_ema, prefix = getattr(system, ema_name, None), f"{ema_name}."
        if not isinstance(kept_ema, LitEma) or any(prefix + s in state for s in kept_ema.m_name2s_name.values()):
            continue  # no EMA kept, or the file has its shadows
        for name, shadow in kept_ema.m_name2s_name.items():
            if source + name in state:
                state[prefix + shadow] = state[source + name].detach().float().clone()
        for fixed in FIXED_BUFFERS:  # a fresh EMA's decay and count
            state.setdefault(prefix + fixed, own[prefix + fixed].detach().clone())
        filled.append(f"{ema_name}.* (from the weights)")
    info = {"ema": ema, "text_encoder": "hf-clip" if hf_named else "native", "version": guess_sd_version(state),
            "ignored": ignored, "filled": filled}
    return state, info


def _fill_value(key: str, own: Tensor) -> Tensor:
    """The value of a key the file lacks: the model's own (real) buffer, CLIP's initial temperature, or zeros."""
    if not own.is_meta:
        return own.detach().clone()
    if key.endswith("logit_scale"):
        return torch.full(own.shape, LOGIT_SCALE_INIT)
    return torch.zeros(own.shape)


def _dtype_rule(dtype: torch.dtype | None):
    """Floating weights of the U-Net, VAE and ControlNet → ``dtype`` (fp32 if None); everything else fp32."""
    cast = dtype or torch.float32

    def rule(key: str, tensor: Tensor) -> torch.dtype | None:
        if not tensor.is_floating_point():
            return None
        return cast if key.startswith((UNET_PREFIX, VAE_PREFIX, CONTROL_PREFIX)) else torch.float32

    return rule


def _check_schedule(system: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Warn when a file's ``alphas_cumprod`` buffer differs from the config's noise schedule."""
    theirs = state.get("alphas_cumprod")
    ours = getattr(getattr(system, "schedule", None), "alphas_cumprod", None)
    if theirs is None or ours is None or ours.is_meta:
        return
    if theirs.shape != ours.shape or (theirs.float() - ours.float().cpu()).abs().max() > SCHEDULE_ATOL:
        warnings.warn("the checkpoint's noise schedule (alphas_cumprod) differs from the config's; sampling uses "
                      "the config's. Check model.params.schedule (SD: linear, 0.00085 → 0.012, 1000 steps).",
                      stacklevel=3)


def guess_sd_version(state: Mapping[str, Tensor]) -> str | None:
    """"sd1" (768-wide context, conv projections) or "sd2" (1024, linear) from a full file's U-Net; None if unclear."""
    key = f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in state:
        return None
    return {768: "sd1", 1024: "sd2"}.get(state[key].shape[-1])


def _mismatch_hint(version: str | None, node: dict) -> str:
    """Which SD the file looks like versus what the config builds, for the strict report."""
    context = (node["params"].get("unet", {}).get("params") or {}).get("context_dim")
    built = {768: "sd1", 1024: "sd2"}.get(context)
    if version and built and version != built:
        return f"The file looks like {version.upper()} but the config builds {built.upper()}. {CONFIG_HINT}"
    return CONFIG_HINT
