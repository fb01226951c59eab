"""Hugging Face ``CLIPTextModel`` weights ↔ open_clip's text tower (Stable Diffusion 1's text encoder).

SD1 checkpoints store OpenAI's CLIP ViT-L/14 text model in transformers' naming under
``cond_stage_model.transformer.`` (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.*``, ``layer_norm1/2``, ``mlp.fc1/fc2``,
``text_model.final_layer_norm.*``; the oldest files lack the ``text_model.`` level). open_clip names the
same tensors ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.attn.in_proj_*``
(q, k and v stacked along dim 0), ``attn.out_proj.*``, ``ln_1/ln_2``, ``mlp.c_fc/c_proj`` and ``ln_final.*``,
which is what ``FrozenOpenCLIP.model`` holds. Attention scaling is applied at run time by both, never baked
into the weights, so the conversion is exact. A ``CLIPTextModel`` has no ``text_projection`` nor ``logit_scale``
(they only serve CLIP's pooled embedding, which SD never uses).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

HF_ROOT = "text_model."
QKV = ("q", "k", "v")  # open_clip's in_proj stacks them in this order
# transformers' own buffer (persistent in old versions): arange(77), recomputed by any model that needs it.
HF_IGNORED = frozenset({"text_model.embeddings.position_ids"})
# The tensors open_clip's tower has and a CLIPTextModel does not (unused for SD's cross-attention context).
OPENCLIP_ONLY = frozenset({"text_projection", "logit_scale"})

# Per-tensor renames: HF (under text_model.) → open_clip. "{i}" is the layer index, "{p}" weight|bias.
_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


class ClipKeyError(KeyError):
    """A key that is not part of the text model the mapping converts, or an incomplete q/k/v triple."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_hf_clip_text(state: Mapping[str, Tensor]) -> bool:
    """True for a Hugging Face CLIP text model's keys (with or without the ``text_model.`` level)."""
    return any(k.startswith(("text_model.encoder.", "encoder.layers.", "text_model.embeddings.")) for k in state)


def _with_root(key: str) -> str:
    """The key under ``text_model.``: old transformers saved ``embeddings.*`` / ``encoder.*`` at the top."""
    return key if key.startswith(HF_ROOT) else HF_ROOT + key


def hf_to_openclip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF ``CLIPTextModel`` state dict → open_clip text-tower keys; every key must be accounted for."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight|bias) → {q, k, v}
    for raw_key, value in state.items():
        key = _with_root(raw_key)
        if key in HF_IGNORED:
            continue
        name = key[len(HF_ROOT):]
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = value
            continue
        match = _HF_LAYER_KEY.match(name)
        if match is None:
            raise ClipKeyError(f"{raw_key!r} is not a key of a Hugging Face CLIP text model")
        layer, module, param = match.groups()
        proj = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if proj is not None:
            qkv.setdefault((layer, param), {})[proj.group(1)] = value
        elif module in _LAYER:
            out[f"transformer.resblocks.{layer}.{_LAYER[module]}.{param}"] = value
        else:
            raise ClipKeyError(f"{raw_key!r} is not a key of a Hugging Face CLIP text model")
    for (layer, param), parts in sorted(qkv.items()):
        absent = [p for p in QKV if p not in parts]
        if absent:
            raise ClipKeyError(f"layer {layer}: self_attn {param} of {', '.join(absent)}_proj missing "
                               "(q, k, v go together)")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in QKV])  # (3W, …)
    return out


def openclip_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip text-tower state dict → HF ``CLIPTextModel`` keys (``text_projection`` / ``logit_scale`` dropped)."""
    top = {v: k for k, v in _TOP_LEVEL.items()}
    layer_names = {v: k for k, v in _LAYER.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in OPENCLIP_ONLY or key == "attn_mask":
            continue
        if key in top:
            out[HF_ROOT + top[key]] = value
            continue
        match = _OC_LAYER_KEY.match(key)
        if match is None:
            raise ClipKeyError(f"{key!r} is not a key of an open_clip CLIP text tower")
        prefix, rest = f"{HF_ROOT}encoder.layers.{match.group(1)}.", match.group(2)
        module, _, param = rest.rpartition(".")
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rpartition("_")[2]
            for name, part in zip(QKV, value.chunk(len(QKV))):  # (3W, …) → 3 × (W, …)
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone()  # own storage: files refuse shared
        elif module in layer_names and param in ("weight", "bias"):
            out[f"{prefix}{layer_names[module]}.{param}"] = value
        else:
            raise ClipKeyError(f"{key!r} has no counterpart in a Hugging Face CLIP text model")
    return out
