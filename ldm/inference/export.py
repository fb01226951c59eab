"""Export a trained model to one `.safetensors` file in Stable Diffusion's public layout; a ControlNet to its own.

An SDXL model (its conditioner, ``SDXLConditioner``) is written in Stability's SDXL layout instead
(``ldm.io.sdxl_layout.model_to_sdxl``: ``conditioner.embedders.0.transformer.*`` in Hugging Face CLIP naming,
``conditioner.embedders.1.model.*``), as ``sd_xl_base_1.0.safetensors`` holds it. Otherwise
the file holds ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` (an SD1-style
encoder — FrozenOpenCLIP, last layer, QuickGELU — in Hugging Face CLIP naming under
``cond_stage_model.transformer.``, any other as this project names it, which for an OpenCLIP tower is SD2's
``cond_stage_model.model.``), optionally ``model_ema.*`` (LitEma naming), the ``betas`` / ``alphas_cumprod``
schedule buffers and this project's ``scale_factor`` / ``image_size``. ``ema="only"`` writes the EMA weights
as the U-Net's own (SD's "-emaonly" files). The inference config travels in the file's metadata and beside
it as ``<name>.yaml``, so ``load_sd(None, file)`` (or ``--ckpt file``) loads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Mapping

import yaml
from torch import Tensor

from ldm.core.config import instantiate_from_config, load_config, save_config
from ldm.inference.loaders import describe_run
from ldm.inference.lora_export import export_lora, lora_settings, merged_state
from ldm.inference.sd import inference_node
from ldm.inference.source_checks import METADATA_LINEAGE, check_run_vae, lineage_of
from ldm.io.checkpoints import (
    CONTROL_PREFIX,
    EMA_PREFIX,
    HF_TEXT_PREFIX,
    METADATA_CONFIG,
    METADATA_EMA,
    METADATA_SOURCE,
    OPENCLIP_TEXT_PREFIX,
    UNET_PREFIX,
    CheckpointError,
    add_prefix,
    load_file,
    save_file_atomic,
    select_ema,
    state_dict_of,
    strip_prefix,
)
from ldm.io.hf_clip import openclip_to_hf
from ldm.io.lora_layout import Layout
from ldm.io.runs import checkpoint_for, resolve_run, run_config
from ldm.io.sdxl_layout import is_sdxl_state, model_to_sdxl

EmaMode = Literal["keep", "only", "drop"]
TextLayout = Literal["auto", "hf", "openclip", "sdxl"]
SCHEDULE_KEYS = ("betas", "alphas_cumprod")  # what tools reading SD files may look for; load_sd checks them
KEEP_FP32 = frozenset({"scale_factor", "model_ema.decay", *SCHEDULE_KEYS})  # never halved: precision matters
FROZEN_OPENCLIP = "ldm.nets.conditioning.openclip.FrozenOpenCLIP"
SDXL_CONDITIONER = "ldm.nets.conditioning.sdxl.SDXLConditioner"
SDXL_EMBEDDERS = "cond_stage_model.embedders."  # where an SDXL conditioner's towers sit in a system's state dict


def text_layout_for(node: Mapping) -> Literal["hf", "openclip", "sdxl"]:
    """"sdxl" for SDXL's conditioner (the whole file in Stability's SDXL layout), "hf" for SD1's text encoder
    (FrozenOpenCLIP, last layer, QuickGELU: a CLIPTextModel), else "openclip"."""
    cond = (node.get("params") or {}).get("cond_stage") or {}
    if cond.get("target") == SDXL_CONDITIONER:
        return "sdxl"
    params = cond.get("params") or {}
    sd1 = cond.get("target") == FROZEN_OPENCLIP and params.get("layer") == "last" and params.get("quick_gelu")
    return "hf" if sd1 else "openclip"


def public_state_dict(state: Mapping[str, Tensor], ema: EmaMode = "keep", half: bool = False,
                      text_layout: Literal["hf", "openclip", "sdxl"] = "openclip",
                      schedule: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A system's state dict (this project's keys) in the public SD layout.

    ``ema``: keep ``model_ema.*``, write it as the U-Net's weights ("only"), or drop it. ``text_layout``: the text
    encoder's names (SD1's "hf", SD2's "openclip"; "sdxl": the whole SDXL layout). ``half``: fp16
    (except ``KEEP_FP32``). ``schedule``: buffers to add (``betas``, ``alphas_cumprod``).
    """
    state = dict(state)
    if ema == "only":
        state, used = select_ema(state, [k for k in state if k.startswith(UNET_PREFIX)], use_ema=True)
        if not used:
            raise CheckpointError("the model has no EMA weights (model_ema.*) to export as its own; drop --ema-only")
    elif ema == "drop":
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    elif ema != "keep":
        raise ValueError(f"ema must be keep, only or drop, got {ema!r}")
    if text_layout == "hf":
        tower = strip_prefix(state, OPENCLIP_TEXT_PREFIX)
        state = {k: v for k, v in state.items() if not k.startswith(OPENCLIP_TEXT_PREFIX)}
        state.update(add_prefix(openclip_to_hf(tower), HF_TEXT_PREFIX))
    elif text_layout == "sdxl" and not is_sdxl_state(state):  # a public SDXL file re-exported is in it already
        if not any(k.startswith(SDXL_EMBEDDERS) for k in state):
            raise CheckpointError("--text-layout sdxl: the model has no SDXL conditioner "
                                  "(cond_stage_model.embedders.*)")
        state = model_to_sdxl(state)  # conditioner.embedders.*: embedder 0 in Hugging Face CLIP names
    for key, value in (schedule or {}).items():
        state[key] = value.float()
    if half:
        state = {k: v.half() if v.is_floating_point() and k not in KEEP_FP32 else v for k, v in state.items()}
    return state


def controlnet_state_dict(state: Mapping[str, Tensor], half: bool = False) -> dict[str, Tensor]:
    """Only the ``control_model.*`` entries (a ControlNet file, as ControlNet v1.1 ships them)."""
    control = add_prefix(strip_prefix(state, CONTROL_PREFIX), CONTROL_PREFIX)
    if not control:
        raise CheckpointError("the model has no ControlNet (control_model.*) to export")
    return {k: v.half() if half and v.is_floating_point() else v for k, v in control.items()}


TRAINING_ONLY = ("base_ckpt", "base_config", "lora")  # how a fine-tune trained: not part of the exported model


def inference_config(cfg: Mapping) -> dict:
    """``name`` + ``model`` of a training config, ready for load_sd: the VAE inlined, no EMA copy, no base file."""
    node = inference_node(cfg["model"])
    for key in TRAINING_ONLY:
        node["params"].pop(key, None)
    return {"name": cfg.get("name", "exported"), "model": node}


def schedule_buffers(node: Mapping) -> dict[str, Tensor]:
    """``betas`` and ``alphas_cumprod`` of the config's VP noise schedule (cheap: built alone), for tools that read
    them; none for other schedule families."""
    objective = (node.get("params") or {}).get("objective") or {}
    schedule_node = (objective.get("params") or {}).get("schedule")
    if schedule_node is None:
        return {}
    schedule = instantiate_from_config(schedule_node, "model.params.objective.params.schedule")
    return {key: getattr(schedule, key) for key in SCHEDULE_KEYS if hasattr(schedule, key)}


def export_checkpoint(source: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
                      ema: EmaMode = "keep", half: bool = False, controlnet_only: bool = False,
                      text_layout: TextLayout = "auto", unsafe: bool = False, lora_layout: Layout | None = None,
                      merge: bool = False) -> Path:
    """Write a run's (``runs/ldm/<name>``, a checkpoint in one) or any checkpoint's weights to ``out`` (.safetensors).

    The config comes from the run, or from ``config`` for a checkpoint outside a run. Besides the file, a full
    export writes its inference config as ``out`` with suffix ``.yaml``. A LoRA run gives a LoRA file in
    ``lora_layout`` (default kohya's), or with ``merge`` its base with the adapters folded in. Returns ``out``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: the export is a .safetensors file")
    ckpt, cfg = _source(source, config)
    lora = lora_settings(cfg) is not None
    if (lora_layout or merge) and not lora:
        raise CheckpointError(f"{source} trains every weight, not LoRA adapters: --lora-layout and --merge are for "
                              "LoRA runs (export it without them)")
    if lora and not merge:
        if config is None:
            check_run_vae(cfg, ckpt, resolve_run(ckpt))  # a VAE link moved to another architecture: refused
        return export_lora(ckpt, cfg, out, lora_layout or "kohya", ema, half)
    if merge:
        state, ema = merged_state(ckpt, use_ema=ema != "drop"), "drop"  # the EMA adapters are folded in
    else:
        state = state_dict_of(load_file(ckpt, unsafe, mmap=True))  # read once: the VAE check and the weights
    if config is None:
        check_run_vae(cfg, state, resolve_run(ckpt))  # a VAE link moved to another architecture: refused
    if controlnet_only:
        save_file_atomic(controlnet_state_dict(state, half), out, {"format": "pt", METADATA_SOURCE: str(ckpt)})
        return out
    infer = inference_config(cfg)
    layout = text_layout_for(infer["model"]) if text_layout == "auto" else text_layout
    tensors = public_state_dict(state, ema, half, layout, schedule_buffers(infer["model"]))
    text = yaml.safe_dump(infer, sort_keys=False)
    lineage = json.dumps(lineage_of(run=ckpt) if config is None else {})  # what the weights were built from
    save_file_atomic(tensors, out, {"format": "pt", METADATA_CONFIG: text, METADATA_SOURCE: str(ckpt),
                                    METADATA_EMA: ema, METADATA_LINEAGE: lineage})
    save_config(infer, out.with_suffix(".yaml"))
    return out


def _source(source: str | os.PathLike, config: str | os.PathLike | None) -> tuple[Path, dict]:
    """(checkpoint file, config) for a run directory, a checkpoint inside a run, or a checkpoint + config."""
    if config is not None:
        path = Path(source)
        if path.is_dir():
            path = checkpoint_for(path)
        return path, load_config(config)
    describe_run(source)  # a stage-2 or ControlNet run, or one line saying what it is instead (e.g. a VAE run)
    ckpt = checkpoint_for(source)
    return ckpt, run_config(ckpt)
