"""diffusers twins of our networks: the same architecture, our weights converted by diffusers' own converters."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.bench.mapping import diffusers_unet_config, diffusers_vae_config
from ldm.io.hf_clip import openclip_to_hf

HF_TEXT_ROOT = "text_model."  # transformers 5's CLIPTextModel keeps its modules one level up

UNET_PREFIX = "model.diffusion_model."  # the prefix diffusers' LDM converter looks for
VAE_PREFIX = "first_stage_model."


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def check_same_size(ours: nn.Module, theirs: nn.Module, what: str) -> int:
    """Raise unless both models have the same parameter count; return it."""
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    if n_ours != n_theirs:
        raise RuntimeError(f"{what}: ours has {n_ours:,} parameters, diffusers' {n_theirs:,}: not the same architecture")
    return n_ours


def _single_file_utils():
    try:
        from diffusers.loaders import single_file_utils
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark needs diffusers: pip install -e .[bench]") from err
    return single_file_utils


def diffusers_unet_like(ours: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """diffusers' ``UNet2DConditionModel`` with ``UNetModel(**params)``'s architecture and ``ours``' weights."""
    import diffusers

    config = diffusers_unet_config(params)
    theirs = diffusers.UNet2DConditionModel(**config)
    state = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(_single_file_utils().convert_ldm_unet_checkpoint(state, config), strict=True)
    check_same_size(ours, theirs, "U-Net")
    return theirs.train(ours.training)


def diffusers_vae_like(ours: nn.Module, ddconfig: Mapping[str, Any], embed_dim: int) -> nn.Module:
    """diffusers' ``AutoencoderKL`` with our VAE's architecture and weights (``ours``: our AutoencoderKL)."""
    import diffusers

    config = diffusers_vae_config(ddconfig, embed_dim)
    theirs = diffusers.AutoencoderKL(**config)
    nets = {k: v for k, v in ours.state_dict().items() if not k.startswith("loss.")}
    state = {VAE_PREFIX + k: v for k, v in nets.items()}
    theirs.load_state_dict(_single_file_utils().convert_ldm_vae_checkpoint(state, config), strict=True)
    ours_nets = nn.ModuleList([ours.encoder, ours.decoder, ours.quant_conv, ours.post_quant_conv])
    check_same_size(ours_nets, theirs, "VAE")
    return theirs.train(ours.training)


@torch.no_grad()
def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: how far apart two outputs of "the same" network are."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def diffusers_text_encoder_like(ours: nn.Module) -> nn.Module:
    """transformers' ``CLIPTextModel`` with the architecture and weights of our SD1 text encoder (``FrozenOpenCLIP``:
    ViT-L/14-style tower, last layer, QuickGELU), as diffusers' Stable Diffusion pipelines hold it."""
    import transformers

    tower = ours.model
    block = tower.transformer.resblocks[0]
    config = transformers.CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=tower.token_embedding.embedding_dim,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=len(tower.transformer.resblocks),
        num_attention_heads=block.attn.heads, max_position_embeddings=tower.context_length, hidden_act="quick_gelu")
    theirs = transformers.CLIPTextModel(config)
    own = theirs.state_dict()
    state = {k if k in own else k.removeprefix(HF_TEXT_ROOT): v for k, v in openclip_to_hf(tower.state_dict()).items()}
    theirs.load_state_dict(state, strict=True)
    return theirs.train(ours.training)
