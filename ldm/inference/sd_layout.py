"""A public Stable Diffusion / ControlNet checkpoint's tensors put into a built system's key layout.

``to_model_layout`` drops what ``IGNORED_KEYS`` lists (after checking the file's schedule against the config's),
chooses the EMA weights, maps SD1's Hugging Face CLIP names to open_clip's (``ldm.io.hf_clip``) and fills the
keys a file may lack (``FILLED_KEYS``; a ControlNet from the U-Net; a kept EMA from the weights).
``component_state`` reads one component (U-Net, VAE, ControlNet) out of a full or bare file.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.inference.sd_control import control_from_unet_state
from ldm.io.checkpoints import (
    CONTROL_PREFIX,
    EMA_PREFIX,
    EMA_SHADOWED,
    FILLED_KEYS,
    HF_TEXT_PREFIX,
    OPENCLIP_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    add_prefix,
    checkpoint_kind,
    drop_ignored,
    select_ema,
    strip_prefix,
)
from ldm.io.hf_clip import ClipKeyError, hf_to_openclip, is_hf_clip_text
from ldm.io.sdxl_layout import SDXL_CONTEXT_KEY, is_sdxl_state, sdxl_to_model
from ldm.nets.conditioning.openclip import LOGIT_SCALE_INIT
from ldm.nets.ema import FIXED_BUFFERS, LitEma

SCHEDULE_ATOL = 1e-3  # |Δᾱ| above which a file's schedule buffers and the config's disagree (fp16-safe)
CONFIG_HINT = ("Is the config right for this file? SD 1.x files go with configs/sd/v1-inference.yaml, SD 2.x "
               "with configs/sd/v2-inference.yaml (512 px, ε) or v2-inference-v.yaml (768 px, v), SD 1.x "
               "inpainting files (a U-Net of 9 input channels) with configs/sd/v1-inpainting-inference.yaml, SDXL base "
               "with configs/sd/xl-base-inference.yaml, ControlNet v1.0 / v1.1 (SD 1.5) with configs/sd/controlnet-v1.yaml.")
Component = Literal["unet", "vae", "controlnet"]


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


def refuse_bare(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    kind = checkpoint_kind(state)
    if kind == "full":
        return
    how = {"vae": "pass it as vae= (a VAE replacing the checkpoint's) together with a full SD checkpoint",
           "controlnet": "pass it as controlnet= together with an SD 1.5 checkpoint",
           "unet": "load it into a model's U-Net with ldm.inference.sd.load_component(model.model.diffusion_model, path, 'unet')",
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
    sdxl = is_sdxl_state(state)
    if sdxl:  # generative-models' conditioner.embedders.* → cond_stage_model.embedders.* (open_clip names)
        try:
            state, _ = sdxl_to_model(state)
        except ClipKeyError as e:
            raise CheckpointError(f"the SDXL text encoders (conditioner.embedders.*) cannot be mapped: {e}") from e
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
    for ema_name, shadowed in EMA_SHADOWED.items():
        kept_ema, prefix, source = getattr(system, ema_name, None), f"{ema_name}.", f"{shadowed}."
        if not isinstance(kept_ema, LitEma) or any(prefix + s in state for s in kept_ema.m_name2s_name.values()):
            continue  # no EMA kept, or the file has its shadows
        for name, shadow in kept_ema.m_name2s_name.items():
            if source + name in state:
                state[prefix + shadow] = state[source + name].detach().float().clone()
        for fixed in FIXED_BUFFERS:  # a fresh EMA's decay and count
            state.setdefault(prefix + fixed, own[prefix + fixed].detach().clone())
        filled.append(f"{ema_name}.* (from the weights)")
    text_encoder = "sdxl" if sdxl else "hf-clip" if hf_named else "native"
    info = {"ema": ema, "text_encoder": text_encoder, "version": guess_sd_version(state),
            "ignored": ignored, "filled": filled}
    return state, info


def _fill_value(key: str, own: Tensor) -> Tensor:
    """The value of a key the file lacks: the model's own (real) buffer, CLIP's initial temperature, or zeros."""
    if not own.is_meta:
        return own.detach().clone()
    if key.endswith("logit_scale"):
        return torch.full(own.shape, LOGIT_SCALE_INIT)
    return torch.zeros(own.shape)


def dtype_rule(dtype: torch.dtype | None):
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


CONTEXT_VERSIONS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the U-Net's cross-attention context width


def guess_sd_version(state: Mapping[str, Tensor]) -> str | None:
    """"sd1" (768-wide context), "sd2" (1024) or "sdxl" (2048, no attention at the first level) from a full file's
    U-Net; None if unclear."""
    key = f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key in state:
        return CONTEXT_VERSIONS.get(state[key].shape[-1])
    if SDXL_CONTEXT_KEY in state:
        return CONTEXT_VERSIONS.get(state[SDXL_CONTEXT_KEY].shape[-1])
    return None


def mismatch_hint(version: str | None, node: dict) -> str:
    """Which SD the file looks like versus what the config builds, for the strict report."""
    context = (node["params"].get("unet", {}).get("params") or {}).get("context_dim")
    built = CONTEXT_VERSIONS.get(context)
    if version and built and version != built:
        return f"The file looks like {version.upper()} but the config builds {built.upper()}. {CONFIG_HINT}"
    return CONFIG_HINT
