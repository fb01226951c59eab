"""SDXL's public key layout (Stability's ``sd_xl_base_1.0.safetensors``, generative-models' names) ↔ this project's.

The file holds the conditioner under ``conditioner.embedders.N.``: a transformers ``CLIPTextModel`` under
``….transformer.`` (CLIP ViT-L/14 text, embedder 0 of the base model) and open_clip towers under ``….model.``
(ViT-bigG/14 text). A built model holds the conditioner as ``cond_stage_model`` (latent-diffusion's name, the one
every stage reads), every tower in open_clip's form (``ldm.io.hf_clip`` maps the transformers names). The U-Net
(``model.diffusion_model.``) and VAE (``first_stage_model.``) keep SD's names.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ldm.io.checkpoints import TEXT_PREFIX, UNET_PREFIX, add_prefix, strip_prefix
from ldm.io.hf_clip import hf_to_openclip, is_hf_clip_text, openclip_to_hf

SDXL_PREFIX = "conditioner."  # generative-models' GeneralConditioner
HF_TOWER = "transformer."  # a transformers CLIPTextModel inside an embedder
OPENCLIP_TOWER = "model."  # an open_clip text tower inside an embedder
HF_POSITION_IDS = "text_model.embeddings.position_ids"  # the buffer the public file carries (arange)
# The U-Net's first cross-attention (the first level has none): its input width tells SDXL's context (2048).
SDXL_CONTEXT_KEY = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_BASE_HF_EMBEDDERS = (0,)  # SDXL base: embedder 0 is a CLIPTextModel; the refiner has none
_EMBEDDER = re.compile(r"embedders\.(\d+)\.")


def is_sdxl_state(state: Mapping[str, Tensor]) -> bool:
    """True for a state dict in generative-models' layout (a ``conditioner.*`` entry)."""
    return any(k.startswith(SDXL_PREFIX) for k in state)


def embedder_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The embedder numbers present under ``prefix`` (``conditioner.`` or ``cond_stage_model.``)."""
    return sorted({int(m.group(1)) for k in state if k.startswith(prefix)
                   for m in [_EMBEDDER.match(k[len(prefix):])] if m})


def sdxl_to_model(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[int]]:
    """A public SDXL state dict with this project's conditioner keys, and which embedders were transformers-named.

    ``conditioner.embedders.N.transformer.*`` → ``cond_stage_model.embedders.N.model.*`` (open_clip names);
    ``conditioner.embedders.N.model.*`` → ``cond_stage_model.embedders.N.model.*``. Raises ``ClipKeyError``
    (``ldm.io.hf_clip``) for a transformers tower that does not map.
    """
    out = {k: v for k, v in state.items() if not k.startswith(SDXL_PREFIX)}
    conditioner = strip_prefix(state, SDXL_PREFIX)
    hf_named = []
    for n in embedder_indices(state, SDXL_PREFIX):
        head = f"embedders.{n}."
        hf = strip_prefix(conditioner, head + HF_TOWER)
        if hf and is_hf_clip_text(hf):
            out.update(add_prefix(hf_to_openclip(hf), f"{TEXT_PREFIX}{head}{OPENCLIP_TOWER}"))
            hf_named.append(n)
        out.update(add_prefix(strip_prefix(conditioner, head + OPENCLIP_TOWER), f"{TEXT_PREFIX}{head}{OPENCLIP_TOWER}"))
        towers = (head + HF_TOWER, head + OPENCLIP_TOWER)
        rest = [k for k in conditioner if k.startswith(head) and not k.startswith(towers)]
        out.update({TEXT_PREFIX + k: conditioner[k] for k in rest})
    return out, hf_named


def model_to_sdxl(state: Mapping[str, Tensor], hf_embedders: Sequence[int] = SDXL_BASE_HF_EMBEDDERS,
                  max_positions: int = 77) -> dict[str, Tensor]:
    """This project's SDXL state dict in the public layout: the conditioner under ``conditioner.``, the towers
    ``hf_embedders`` in transformers' names (with the position-id buffer the public file carries)."""
    out = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
    conditioner = strip_prefix(state, TEXT_PREFIX)
    for n in embedder_indices(state, TEXT_PREFIX):
        head = f"embedders.{n}."
        tower = strip_prefix(conditioner, head + OPENCLIP_TOWER)
        if n in hf_embedders:
            hf = openclip_to_hf(tower)
            positions = hf["text_model.embeddings.position_embedding.weight"].shape[0] if hf else max_positions
            hf[HF_POSITION_IDS] = torch.arange(positions)[None]  # (1, L) int64
            out.update(add_prefix(hf, f"{SDXL_PREFIX}{head}{HF_TOWER}"))
        else:
            out.update(add_prefix(tower, f"{SDXL_PREFIX}{head}{OPENCLIP_TOWER}"))
    return out
