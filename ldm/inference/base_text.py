"""A fine-tune's frozen text encoder with its base file's weights, without the rest of the model.

Only the file's text tensors are read (``cond_stage_model.*`` for SD 1.x / 2.x, ``conditioner.*`` for SDXL); they are
put in the model's layout exactly as loading the whole base does (``ldm.inference.sd_layout.to_model_layout``: SD1's
Hugging Face CLIP names mapped to open_clip's, SDXL's embedders renamed, the keys a file lacks filled), in fp32 as
the loaded model holds its text encoder. Cached text embeddings (``ldm.training.text_cache``) encode the captions with
this encoder and name it by the hash of these weights.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ldm.core.config import instantiate_from_config
from ldm.inference.sd import build_sd
from ldm.inference.sd_base import base_hint
from ldm.inference.sd_layout import to_model_layout
from ldm.io.checkpoints import TEXT_PREFIX, load_assign, load_prefixed, params_on_meta, strip_prefix
from ldm.io.sdxl_layout import SDXL_PREFIX

TEXT_FILE_PREFIXES = (TEXT_PREFIX, SDXL_PREFIX)  # where public files keep their text encoders


def base_text_state(base_ckpt: str | os.PathLike, base_config: str | os.PathLike) -> dict[str, Tensor]:
    """The text encoder's weights as loading the base gives them to its model: bare keys (``model.*`` /
    ``embedders.N.model.*``), floating tensors in fp32."""
    state = load_prefixed(base_ckpt, TEXT_FILE_PREFIXES)  # type: ignore[arg-type]  # str.startswith takes a tuple
    system = build_sd(base_config, on_meta=True)  # the layout's reference (U-Net names, keys to fill): no memory
    state, _ = to_model_layout(system, state)
    text = strip_prefix(state, TEXT_PREFIX)
    return {k: v.float() if v.is_floating_point() else v for k, v in text.items()}


def load_base_text_encoder(node: dict, base_ckpt: str | os.PathLike, base_config: str | os.PathLike,
                           path: str = "model.params.cond_stage") -> nn.Module:
    """The text encoder of config ``node`` (a fine-tune's ``cond_stage``) with the base file's weights, loaded strictly;
    frozen, in eval mode."""
    with params_on_meta():
        encoder = instantiate_from_config(node, path)
    load_assign(encoder, base_text_state(base_ckpt, base_config), f"the text encoder of the base {base_ckpt}",
                dtype_for=lambda key, t: torch.float32 if t.is_floating_point() else None, hint=base_hint(str(base_config)))
    return encoder.eval().requires_grad_(False)
