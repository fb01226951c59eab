"""A fine-tune's frozen text encoder with its base file's weights, without the rest of the model.

Only the file's text tensors are read (``cond_stage_model.*`` for SD 1.x / 2.x, ``conditioner.*`` for SDXL); they are
put in the model's layout exactly as loading the whole base does (``ldm.inference.sd_layout.to_model_layout``: SD1's
Hugging Face CLIP names mapped to open_clip's, SDXL's embedders renamed, the keys a file lacks filled), in fp32 as
the loaded model holds its text encoder. Cached text embeddings (``ldm.training.text_cache``) encode the captions with
this encoder and name it by the hash of these weights (``base_text_hash``: computed tensor by tensor, so an SDXL
base's 3 GB of fp32 text weights are never held at once). A system whose text encoder is a cached stand-in takes its
base's other weights with the stand-in's own (``with_cached_text``): the file's text tensors are not even read.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ldm.core.config import instantiate_from_config
from ldm.inference.sd import build_sd
from ldm.inference.sd_layout import CONFIG_HINT, to_model_layout
from ldm.io.checkpoints import TEXT_PREFIX, add_prefix, load_prefixed, strip_prefix, tensors_hash
from ldm.io.module_weights import load_assign, params_on_meta
from ldm.io.sdxl_layout import SDXL_PREFIX
from ldm.nets.conditioning.cached import FrozenWeights

TEXT_FILE_PREFIXES = (TEXT_PREFIX, SDXL_PREFIX)  # where public files keep their text encoders


class AsFloat32(Mapping):
    """A state dict whose floating tensors read as fp32, each cast when it is read."""

    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state

    def __getitem__(self, key: str) -> Tensor:
        tensor = self.state[key]
        return tensor.float() if tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def base_text_state(base_ckpt: str | os.PathLike, base_config: str | os.PathLike) -> dict[str, Tensor]:
    """The text encoder's weights as loading the base gives them to its model, bare keys (``model.*`` /
    ``embedders.N.model.*``), in the file's dtype (the model holds them in fp32: ``AsFloat32``)."""
    state = load_prefixed(base_ckpt, TEXT_FILE_PREFIXES)  # type: ignore[arg-type]  # str.startswith takes a tuple
    system = build_sd(base_config, on_meta=True)  # the layout's reference (U-Net names, keys to fill): no memory
    state, _ = to_model_layout(system, state)
    return strip_prefix(state, TEXT_PREFIX)


def base_text_hash(base_ckpt: str | os.PathLike, base_config: str | os.PathLike) -> str:
    """The identity of a base's text encoder: the hash of its fp32 weights (as ``tensors_hash`` of the loaded
    encoder's state dict gives it)."""
    return tensors_hash(AsFloat32(base_text_state(base_ckpt, base_config)))


def load_base_text_encoder(node: dict, base_ckpt: str | os.PathLike, base_config: str | os.PathLike,
                           path: str = "model.params.cond_stage") -> nn.Module:
    """The text encoder of config ``node`` (a fine-tune's ``cond_stage``) with the base file's weights in fp32, loaded
    strictly; frozen, in eval mode."""
    with params_on_meta():
        encoder = instantiate_from_config(node, path)
    load_assign(encoder, base_text_state(base_ckpt, base_config), f"the text encoder of the base {base_ckpt}",
                dtype_for=lambda key, t: torch.float32 if t.is_floating_point() else None,
                hint=f"Is {base_config} the file's inference config? {CONFIG_HINT}")
    return encoder.eval().requires_grad_(False)


def with_cached_text(system: nn.Module, state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A base file's tensors for ``system``: when its text encoder is a cached stand-in (whose weights the cache checked
    to be this base's), the file's text tensors are left unread and the stand-in's own weights take their place."""
    stand_in = getattr(system, "cond_stage_model", None)
    if not isinstance(stand_in, FrozenWeights):
        return state
    kept = {k: v for k, v in state.items() if not k.startswith(TEXT_FILE_PREFIXES)}
    kept.update(add_prefix(stand_in.weights, TEXT_PREFIX))
    return kept
