"""FrozenOpenCLIP: an open_clip text tower as the cross-attention context (Stable Diffusion 2's encoder).

Semantics of stablediffusion's ``FrozenOpenCLIPEmbedder``: the CLIP text transformer without its visual
tower, stored as ``self.model`` so a state dict carries SD2's ``cond_stage_model.model.*`` names
(``model.token_embedding.weight``, ``model.transformer.resblocks.N.*``, ``model.ln_final.*``,
``model.positional_embedding``, ``model.text_projection``, ``model.logit_scale``); the context is the
last or the penultimate block's output followed by ``ln_final``. ``arch="ViT-L-14"``, ``layer="last"``
is SD1's text tower in open_clip form (OpenAI weights use QuickGELU: ``quick_gelu=True``, and Hugging
Face's tokenizer pads with the end token: ``pad_token_id=49407``).
"""

from __future__ import annotations

import difflib
import math
import os
from contextlib import nullcontext
from typing import Literal, Sequence

import open_clip
import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import nn

from ldm.nets.conditioning.base import Embedder
from ldm.nets.conditioning.clip_attention import ClipSelfAttention
from ldm.nets.conditioning.openclip_weights import (
    read_state_dict,
    resolve_pretrained,
    text_state_dict,
)
from ldm.nets.conditioning.tokens import CaptionTokenizer, clip_tokenizer

# How many blocks at the end of the transformer the context skips.
LAYERS = {"last": 0, "penultimate": 1}
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature


class OpenCLIPTextModel(nn.Module):
    """open_clip's ``CLIP`` without the visual tower (same attribute names, so the same state-dict keys)."""

    def __init__(self, embed_dim: int, text_cfg: CLIPTextCfg, quick_gelu: bool = False):
        super().__init__()
        text = _build_text_tower(embed_dim, text_cfg, quick_gelu)
        self.transformer = text.transformer
        for block in self.transformer.resblocks:  # q, k, v and out as Linear layers (LoRA), same state-dict keys
            block.attn = ClipSelfAttention.from_mha(block.attn)
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * LOGIT_SCALE_INIT)

    def hidden_states(self, tokens: torch.Tensor, skip_last_blocks: int = 0) -> torch.Tensor:
        """Token ids ``(B, L)`` → ``ln_final`` of the output of all blocks but the last ``skip_last_blocks``."""
        return self.ln_final(self.block_outputs(tokens, len(self.transformer.resblocks) - skip_last_blocks)[-1])

    def block_outputs(self, tokens: torch.Tensor, n_blocks: int) -> list[torch.Tensor]:
        """Token ids ``(B, L)`` → the outputs ``(B, L, W)`` of the first ``n_blocks`` blocks (no ``ln_final``)."""
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, W)
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, W)
        outputs = []
        for block in self.transformer.resblocks[:n_blocks]:
            x = block(x, attn_mask=self.attn_mask)
            outputs.append(x if batch_first else x.transpose(0, 1))  # (B, L, W)
        return outputs

    def pooled(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: ``ln_final`` of the last block's output ``(B, L, W)`` at each caption's end token
        (its highest id), projected by ``text_projection`` → ``(B, embed_dim)``."""
        eot = tokens.argmax(dim=-1)  # (B,)
        x = self.ln_final(last)[torch.arange(last.shape[0], device=last.device), eot]  # (B, W)
        return x @ self.text_projection  # (B, embed_dim)


class FrozenOpenCLIP(Embedder):
    """open_clip text encoder: ``forward(captions) -> (B, max_length, width)`` from the chosen layer.

    ``pretrained``: an open_clip tag (downloaded, or found in the Hugging Face cache), a local weights file
    (or a folder holding one), or ``None`` for random weights. ``text_cfg`` overrides fields of the arch's
    text config (e.g. ``{width: 32, layers: 2, heads: 2}`` for a toy tower in tests). ``final_norm: false`` leaves
    ``ln_final`` off the context (SDXL's encoders: the penultimate block's raw output); ``encode_pooled`` also gives
    CLIP's projected text embedding.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: Literal["last", "penultimate"] = "penultimate",
        max_length: int = 77,
        freeze: bool = True,
        text_cfg: dict | None = None,
        key: str = "caption",
        quick_gelu: bool | None = None,
        pad_token_id: int = 0,
        final_norm: bool = True,
    ):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            raise ValueError(f"unknown open_clip arch {arch!r}" + (f"; did you mean {close}?" if close else ""))
        cfg = _text_config(arch, model_cfg["text_cfg"], text_cfg, max_length)
        if cfg.layers <= LAYERS[layer]:
            raise ValueError(f"layer {layer!r} needs more than {LAYERS[layer]} transformer layers, got {cfg.layers}")
        if cfg.vocab_size < clip_tokenizer().vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} < the tokenizer's {clip_tokenizer().vocab_size}")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))

        path = resolve_pretrained(arch, pretrained) if pretrained else None  # fail fast, before building
        self.model = OpenCLIPTextModel(model_cfg["embed_dim"], cfg, quick_gelu)
        if path is not None:
            load_text_weights(self.model, path, arch)

        self.tokenizer = CaptionTokenizer(max_length, pad_token_id)
        self.key = key
        self.context_dim = cfg.width
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = LAYERS[layer]
        self.final_norm = final_norm
        self.frozen = False
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        """Eval mode and no gradients, for good (``train()`` keeps it in eval)."""
        self.frozen = True
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenOpenCLIP":
        """As ``nn.Module.train``, but a frozen encoder always stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def null_condition(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → context ``(B, max_length, width)``."""
        tokens = self.tokenizer(captions).to(self.model.positional_embedding.device)  # (B, L)
        with torch.no_grad() if self.frozen else nullcontext():
            return self.encode_with_transformer(tokens)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` → context ``(B, L, width)`` from ``self.layer`` (+ ``ln_final`` if final_norm)."""
        if self.final_norm:
            return self.model.hidden_states(tokens, skip_last_blocks=self.layer_idx)
        return self.model.block_outputs(tokens, len(self.model.transformer.resblocks) - self.layer_idx)[-1]

    def encode_pooled(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (context ``(B, L, width)`` as ``forward``, CLIP's projected text embedding ``(B, E)``)."""
        tokens = self.tokenizer(captions).to(self.model.positional_embedding.device)  # (B, L)
        with torch.no_grad() if self.frozen else nullcontext():
            outputs = self.model.block_outputs(tokens, len(self.model.transformer.resblocks))
            context = outputs[-1 - self.layer_idx]  # (B, L, W)
            return self.model.ln_final(context) if self.final_norm else context, self.model.pooled(outputs[-1], tokens)


def _text_config(arch: str, base: dict, overrides: dict | None, max_length: int) -> CLIPTextCfg:
    """The arch's text config with ``overrides`` applied and the context set to ``max_length``."""
    overrides = dict(overrides or {})
    ctx = overrides.pop("context_length", max_length)
    if ctx != max_length:
        raise ValueError(f"text_cfg.context_length {ctx} != max_length {max_length}; set max_length only")
    fields = set(CLIPTextCfg.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"text_cfg: unknown field(s) {unknown} for open_clip's CLIPTextCfg; known: {sorted(fields)}")
    cfg = CLIPTextCfg(**{**base, **overrides, "context_length": max_length})
    if cfg.hf_model_name:
        raise ValueError(
            f"arch {arch!r} has a Hugging Face text tower ({cfg.hf_model_name}); only CLIP towers are supported"
        )
    return cfg


def load_text_weights(model: OpenCLIPTextModel, path: str | os.PathLike, arch: str = "") -> None:
    """Load a CLIP / SD checkpoint's text-tower weights into ``model`` (visual tower ignored), strictly."""
    misfit = f"{path}: the weights do not fit the open_clip {arch} text tower (check arch / text_cfg)"
    state = text_state_dict(read_state_dict(path))
    pos = state.get("positional_embedding")
    if pos is not None and pos.shape[0] != model.context_length:
        if pos.shape[0] < model.context_length or model.attn_mask is None:
            raise ValueError(
                f"{path}: the checkpoint's text context is {pos.shape[0]} tokens; max_length {model.context_length} "
                "must not exceed it"
            )
        # With a causal mask, the first positions never see later ones: keeping them is exact.
        state["positional_embedding"] = pos[: model.context_length]
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(f"{misfit}: {e}") from e
    if missing or unexpected:
        raise RuntimeError(
            f"{misfit}: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}"
        )
