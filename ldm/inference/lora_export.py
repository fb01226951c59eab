"""A LoRA run exported: its adapters as a small shared LoRA file (kohya's or diffusers' layout), or folded into its base
as one public SD file.

``export_lora`` writes the adapters of a run's checkpoint (their EMA when the run kept one, unless ``ema="drop"``)
with kohya's ``ss_*`` metadata (an SDXL run's in kohya's SDXL layout: ``lora_te1_`` / ``lora_te2_``, generative-models'
U-Net block names), so AUTOMATIC1111, ComfyUI and diffusers load them onto the base file; ``merged_state``
is the run's whole model with the adapters folded in, for ``scripts/export.py --merge``.
"""

from __future__ import annotations

import json

import os
from pathlib import Path
from typing import Literal, Mapping

from torch import Tensor

from ldm.core.config import instantiate_from_config
from ldm.inference.loaders import describe_run
from ldm.inference.lora_files import trained_lora, write_lora_file
from ldm.inference.source_checks import METADATA_LINEAGE, lineage_of
from ldm.inference.sd_base import load_run_system
from ldm.io.checkpoints import METADATA_SOURCE, UNET_PREFIX, load_file, select_ema, state_dict_of
from ldm.io.lora_layout import Layout, LoraFileError
from ldm.nets.lora import LoRA, is_lora_key

KOHYA_NETWORK_MODULE = "networks.lora"  # what kohya's sd-scripts writes for a plain LoRA
SD2_CONTEXT_DIM = 1024
SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL base


def lora_settings(cfg: Mapping) -> LoRA | None:
    """The LoRA settings of a run's config (None for a run that trains every weight)."""
    node = ((cfg.get("model") or {}).get("params") or {}).get("lora")
    return instantiate_from_config(node, "model.params.lora") if node else None


def _unet_params(cfg: Mapping) -> dict:
    return (((cfg.get("model") or {}).get("params") or {}).get("unet") or {}).get("params") or {}


def text_encoders(cfg: Mapping) -> int:
    """How many text encoders the run's model has: SDXL's conditioner has one per embedder, SD one."""
    cond = ((cfg.get("model") or {}).get("params") or {}).get("cond_stage") or {}
    return len((cond.get("params") or {}).get("embedders") or [None])


def kohya_metadata(settings: LoRA, cfg: Mapping) -> dict[str, str]:
    """The ``ss_*`` entries kohya's sd-scripts writes that tools read to describe a LoRA."""
    v2 = _unet_params(cfg).get("context_dim") == SD2_CONTEXT_DIM
    version = SDXL_VERSION if text_encoders(cfg) > 1 else "sd_v2" if v2 else "sd_v1"
    return {"ss_network_module": KOHYA_NETWORK_MODULE, "ss_network_dim": str(settings.rank),
            "ss_network_alpha": str(settings.scale * settings.rank), "ss_v2": str(v2),
            "ss_base_model_version": version}


def export_lora(ckpt: str | os.PathLike, cfg: Mapping, out: str | os.PathLike, layout: Layout = "kohya",
                ema: Literal["keep", "only", "drop"] = "keep", half: bool = False) -> Path:
    """Write a LoRA run's adapters (``ckpt``: one of its checkpoints, ``cfg``: its config) as a LoRA file (fp16 weights
    with ``half``, as shared files often are)."""
    settings = lora_settings(cfg)
    if settings is None:
        raise LoraFileError("the run trains every weight, not LoRA adapters: export it as a whole model "
                            "(drop --lora-layout)")
    state = state_dict_of(load_file(ckpt))
    adapters = [k for k in state if k.startswith(UNET_PREFIX) and is_lora_key(k)]
    state, used = select_ema(state, adapters, use_ema=ema != "drop")
    res_blocks = _unet_params(cfg).get("num_res_blocks")
    metadata = {**kohya_metadata(settings, cfg), METADATA_SOURCE: str(ckpt), "ldm.ema": str(used),
                METADATA_LINEAGE: json.dumps(lineage_of(run=ckpt))}  # the base, cache and VAE it was trained on
    return write_lora_file(trained_lora(state, settings), out, layout, res_blocks, metadata, half, text_encoders(cfg))


def merged_state(ckpt: str | os.PathLike, use_ema: bool = True) -> dict[str, Tensor]:
    """A LoRA run's model (base file + adapters, their EMA with ``use_ema``) with the adapters folded in."""
    system, _ = load_run_system(describe_run(ckpt), use_ema)
    system.merge_lora()
    return system.state_dict()
