"""Toy-size SDXL: configs/sd/xl-base-inference.yaml shrunk (same modules and key names), its file in the public
layout (generative-models' names, fp16, no EMA), and diffusers' StableDiffusionXLPipeline built from that file with
diffusers' own single-file converters, for equality tests."""

from __future__ import annotations

import functools
import json

import torch
from safetensors.torch import save_file

from ldm.bench.mapping import diffusers_unet_config, diffusers_vae_config
from ldm.core.config import load_config, save_config
from ldm.inference.sd import SD_CONFIG_DIR, build_sd
from ldm.io.checkpoints import FILLED_KEYS, UNET_PREFIX, VAE_PREFIX, strip_prefix
from ldm.io.hf_clip import HF_IGNORED
from ldm.io.sdxl_layout import model_to_sdxl
from ldm.nets.conditioning.tokens import clip_tokenizer
from tests.sd_toy import VAE, randomize

PIXELS = 16  # f = 2 → 8×8 latents
TEXT_CFG = {"width": 32, "heads": 2, "layers": 3}
UNET = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
        "transformer_depth": [0, 2], "num_head_channels": 8, "context_dim": 64}
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
CLIP_L_PREFIX, CLIP_G_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def tiny_xl_config() -> dict:
    """``configs/sd/xl-base-inference.yaml`` at toy size (two 3-layer, 32-wide text towers; a 2-level U-Net)."""
    cfg = load_config(SD_CONFIG_DIR / "xl-base-inference.yaml")
    params = cfg["model"]["params"]
    params["image_size"] = PIXELS
    params["unet"]["params"].update(UNET)
    params["first_stage"]["params"]["ddconfig"].update({k: json.loads(v) if isinstance(v, str) else v
                                                        for k, v in VAE.items()})
    for embedder in params["cond_stage"]["params"]["embedders"]:
        embedder["params"]["text_cfg"] = dict(TEXT_CFG)
    return cfg


def tiny_xl_system(seed: int = 0):
    """A toy SDXL system with random weights (every tensor nonzero), in eval mode."""
    return randomize(build_sd(tiny_xl_config()), seed)


def public_xl_state(system, half: bool = True) -> dict[str, torch.Tensor]:
    """``system``'s weights as Stability's SDXL file holds them (fp16, generative-models' names)."""
    state = {k: v.clone() for k, v in system.state_dict().items() if k not in FILLED_KEYS}
    state = model_to_sdxl(state)
    return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}


@functools.cache
def _public_xl_state(seed: int) -> dict[str, torch.Tensor]:
    """``public_xl_state`` of ``tiny_xl_system(seed)``, made once per test process (only ever saved, never changed)."""
    return public_xl_state(tiny_xl_system(seed))


def write_xl_file(folder, seed: int = 0) -> tuple:
    """A toy SDXL file in the public layout and its inference config, under ``folder``: (ckpt, config)."""
    ckpt, config = folder / f"toy-sdxl-{seed}.safetensors", folder / "toy-sdxl.yaml"
    save_file(_public_xl_state(seed), str(ckpt))
    save_config(tiny_xl_config(), config)
    return ckpt, config


def clip_tokenizers(folder):
    """transformers CLIPTokenizers over open_clip's shipped vocabulary (offline): SDXL's first (pads with the end
    token) and second (pads with "!", id 0), as diffusers' SDXL pipelines hold them."""
    from transformers import CLIPTokenizer

    tok = clip_tokenizer()
    vocab = {HF_SPECIAL.get(k, k): v for k, v in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    made = [CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad)
            for pad in ("<|endoftext|>", "!")]
    for t in made:
        t.model_max_length = 77
    return made


def _text_config(hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_CFG["width"], intermediate_size=4 * TEXT_CFG["width"],
                          num_hidden_layers=TEXT_CFG["layers"], num_attention_heads=TEXT_CFG["heads"],
                          max_position_embeddings=77, hidden_act=hidden_act, **extra)


def _load_hf(model, state: dict) -> None:
    """Strict load, whichever of transformers' key forms (with or without ``text_model.``) the model uses."""
    own = model.state_dict()
    state = {k if k in own else k.removeprefix("text_model."): v for k, v in state.items() if k not in HF_IGNORED}
    model.load_state_dict(state, strict=True)


def diffusers_xl_pipeline(state: dict[str, torch.Tensor], config: dict, folder):
    """diffusers' StableDiffusionXLPipeline from a toy SDXL file's tensors (fp32), through diffusers' single-file
    converters, with the scheduler of Stability's SDXL base repository (Euler, leading spacing, steps_offset 1)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    params = config["model"]["params"]
    unet_params = params["unet"]["params"]
    unet = UNet2DConditionModel(**diffusers_unet_config(unet_params))
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet.config), strict=True)
    ddconfig, embed_dim = params["first_stage"]["params"]["ddconfig"], params["first_stage"]["params"]["embed_dim"]
    vae = AutoencoderKL(**diffusers_vae_config(ddconfig, embed_dim), scaling_factor=params["scale_factor"])
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae.config), strict=True)
    text_encoder = CLIPTextModel(_text_config("quick_gelu"))
    _load_hf(text_encoder, sfu.convert_ldm_clip_checkpoint(state))
    projection = state[CLIP_G_PREFIX + "text_projection"].shape[1]
    text_encoder_2 = CLIPTextModelWithProjection(_text_config("gelu", projection))
    _load_hf(text_encoder_2, sfu.convert_open_clip_checkpoint(text_encoder_2, state, prefix=CLIP_G_PREFIX))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                                       prediction_type="epsilon", interpolation_type="linear")
    tokenizer, tokenizer_2 = clip_tokenizers(folder)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """A public SDXL state dict's components with bare keys (U-Net, VAE, the two text towers)."""
    return {"unet": strip_prefix(state, UNET_PREFIX), "vae": strip_prefix(state, VAE_PREFIX),
            "clip_l": strip_prefix(state, CLIP_L_PREFIX), "clip_g": strip_prefix(state, CLIP_G_PREFIX)}
