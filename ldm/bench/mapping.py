"""Describe our U-Net / VAE arguments in diffusers' terms (pure dicts: importing this needs no diffusers).

``UNetModel`` takes openaimodel's arguments; diffusers' ``UNet2DConditionModel`` takes block types, widths
and, confusingly, ``attention_head_dim`` meaning the number of heads per level (its SD-checkpoint
converter does the same). ``AutoencoderKL``'s ``ddconfig`` maps to diffusers' ``AutoencoderKL``, whose
only attention is the middle block's: per-level ``attn_resolutions`` have no diffusers counterpart.
"""

from __future__ import annotations

from typing import Any, Mapping

# openaimodel defaults of the arguments the mapping reads (UNetModel's signature).
UNET_DEFAULTS: dict[str, Any] = {
    "num_heads": -1, "num_head_channels": -1, "transformer_depth": 1, "use_linear_in_transformer": False,
    "resblock_updown": False, "use_scale_shift_norm": False, "conv_resample": True, "num_classes": None,
    "channel_mult": (1, 2, 4, 8), "context_dim": None, "use_spatial_transformer": False,
}
# U-Net arguments diffusers' UNet2DConditionModel has no equivalent for (when not at these values).
UNET_UNSUPPORTED: dict[str, Any] = {
    "resblock_updown": False, "use_scale_shift_norm": False, "conv_resample": True, "num_classes": None,
    "use_spatial_transformer": True,
}
ADM = "sequential"  # num_classes of an SDXL U-Net: the ADM vector, diffusers' "text_time" addition embedding
SIZE_EMBED_DIM = 256  # SDXL's sinusoidal width per size number (diffusers' addition_time_embed_dim)


def heads_per_level(params: Mapping[str, Any]) -> list[int]:
    """Attention heads at each level of the U-Net, by openaimodel's rule (num_heads or width / num_head_channels)."""
    p = {**UNET_DEFAULTS, **params}
    widths = [p["model_channels"] * m for m in p["channel_mult"]]
    if p["num_head_channels"] == -1:
        return [p["num_heads"]] * len(widths)
    return [w // p["num_head_channels"] for w in widths]


def diffusers_unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of diffusers' ``UNet2DConditionModel`` for the architecture of ``UNetModel(**params)``."""
    p = {**UNET_DEFAULTS, **params}
    adm = p["num_classes"] == ADM
    for key, supported in UNET_UNSUPPORTED.items():
        if p[key] != supported and not (key == "num_classes" and adm):
            raise ValueError(f"{key}={p[key]!r} has no diffusers UNet2DConditionModel equivalent (need {supported!r})")
    levels = len(p["channel_mult"])
    has_attention = [2**level in p["attention_resolutions"] for level in range(levels)]
    num_res_blocks = p["num_res_blocks"]
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "block_out_channels": [p["model_channels"] * m for m in p["channel_mult"]],
        "layers_per_block": num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": heads_per_level(p),  # diffusers' name for the number of heads
        "use_linear_projection": p["use_linear_in_transformer"],
        "transformer_layers_per_block": p["transformer_depth"],
        "class_embed_type": None,
        "addition_embed_type": "text_time" if adm else None,
        **({"addition_time_embed_dim": SIZE_EMBED_DIM, "projection_class_embeddings_input_dim": p["adm_in_channels"]}
           if adm else {}),
    }


def diffusers_vae_config(ddconfig: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """Keyword arguments of diffusers' ``AutoencoderKL`` for ``ldm.systems.autoencoder.AutoencoderKL(ddconfig, embed_dim)``."""
    if list(ddconfig.get("attn_resolutions", [])):
        raise ValueError("ddconfig.attn_resolutions must be empty: diffusers' AutoencoderKL has attention only mid-block")
    if ddconfig["z_channels"] != embed_dim:
        raise ValueError(f"z_channels={ddconfig['z_channels']} != embed_dim={embed_dim}: diffusers ties them")
    levels = len(ddconfig["ch_mult"])
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
        "layers_per_block": ddconfig["num_res_blocks"],
        "latent_channels": embed_dim,
        "sample_size": ddconfig["resolution"],
    }
