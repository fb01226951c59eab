"""The toy SD 1.x file the LoRA-file tests share, and diffusers' twin of it (our U-Net and text encoder converted by
diffusers' own converters, in a StableDiffusionPipeline): each made once per test process. diffusers loads a LoRA into
the twin with its ``load_lora_weights`` and takes it out again with ``delete_adapters`` (peft's layers then compute
their own weights alone, exactly), so one twin serves every file."""

from __future__ import annotations

import copy
import functools

import torch

from ldm.bench.twins import diffusers_text_encoder_like, diffusers_unet_like
from tests.sd_toy import shared_file_pipeline, tiny_config, write_sd_file

SEED = 5  # the toy file's weights
ADAPTER = "under-test"  # the name diffusers loads each file under


@functools.cache
def lora_sd_file(folder) -> tuple:
    """(toy SD 1.x file, its config) written once per test process under ``folder`` (the session's work folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_sd_file(folder, seed=SEED)


@functools.cache
def clean_twins(ckpt, config) -> tuple:
    """diffusers' U-Net and text encoder holding the file's weights as our Pipeline loads them: never given an adapter
    (copy them to make one)."""
    base = shared_file_pipeline(ckpt, config)  # read only
    params = tiny_config("v1-inference")["model"]["params"]["unet"]["params"]
    return diffusers_unet_like(base.model.diffusion_model, params).eval(), \
        diffusers_text_encoder_like(base.cond_stage_model).eval()


@functools.cache
def diffusers_twin(ckpt, config):
    """diffusers' StableDiffusionPipeline over copies of the clean twins, built once (LoRA files are loaded into it and
    deleted again)."""
    import diffusers

    unet, text = (copy.deepcopy(m) for m in clean_twins(ckpt, config))
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(), text_encoder=text, tokenizer=None, unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_lora_outputs(ckpt, config, path, prompts: list[str], x: torch.Tensor, t: torch.Tensor) -> tuple:
    """(text context, U-Net output) of diffusers' twin with the LoRA file loaded by its ``load_lora_weights``; the
    adapter is deleted after."""
    pipe = diffusers_twin(ckpt, config)
    tokens = shared_file_pipeline(ckpt, config).cond_stage_model.tokenizer(prompts)
    pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    try:
        with torch.no_grad():
            context = pipe.text_encoder(tokens).last_hidden_state
            return context, pipe.unet(x, t, encoder_hidden_states=context).sample
    finally:
        pipe.delete_adapters(ADAPTER)
