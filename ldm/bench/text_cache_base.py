"""A fine-tune of a public SD file, step time and resident memory: the base's frozen text encoder in the loop vs its
cached text embeddings (``cache.text_embeddings: true``).

Both sides build the fine-tune's system from the base's inference config and load the base file into it, as a new run
does (``ldm.inference.sd_base.prepare_weights``); "encoder" encodes the batch's captions every step, "cached" puts
the stand-in that training on a text cache builds (``ldm.training.text_cache.cached_text_stage``: the encoder's weights
memory-mapped from the cache folder) in its place and takes the contexts from the batch. ``write_small_base`` writes
an SD 1.x file whose text encoder is the public one (CLIP ViT-L/14 text, 123 M parameters, random weights) over a small
U-Net and VAE, so that a CPU can step it; the same functions take a real file.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from ldm.bench.text_cache import CONTEXTS, captions, timed_steps
from ldm.core.config import instantiate_from_config, load_config, save_config
from ldm.data.text_cache import encode_captions
from ldm.data.text_shards import ENCODER_FILE, UNCOND_FILE
from ldm.inference.base_text import load_base_text_encoder
from ldm.inference.export import public_state_dict, text_layout_for
from ldm.inference.sd import SD_CONFIG_DIR, build_sd, read_model_config
from ldm.inference.sd_base import prepare_weights
from ldm.io.checkpoints import FILLED_KEYS
from ldm.io.module_weights import params_on_meta
from ldm.training.text_cache import cached_text_stage

MIB = 2**20
LATENT = (4, 16, 16)  # the small base's latents: 32 px images through its f = 2 VAE (any size trains the U-Net)
SMALL_BASE = [  # configs/sd/v1-inference.yaml with a small U-Net and VAE; the text encoder stays SD 1.x's
    "model.params.unet.params.model_channels=64", "model.params.unet.params.channel_mult=[1,2]",
    "model.params.unet.params.num_res_blocks=1", "model.params.unet.params.attention_resolutions=[2]",
    "model.params.unet.params.num_heads=4", "model.params.first_stage.params.ddconfig.ch=32",
    "model.params.first_stage.params.ddconfig.ch_mult=[1,2]",
    "model.params.first_stage.params.ddconfig.num_res_blocks=1",
]


def write_small_base(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """An SD 1.x file in the public layout (SD 1.x's text encoder, a small U-Net and VAE; random weights) and its
    inference config: (file, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, config = folder / "small-sd1.safetensors", folder / "small-sd1.yaml"
    cfg = load_config(SD_CONFIG_DIR / "v1-inference.yaml", SMALL_BASE)
    if not ckpt.is_file():
        torch.manual_seed(seed)
        state = {k: v for k, v in build_sd(cfg).state_dict().items() if k not in FILLED_KEYS}
        save_file(public_state_dict(state, text_layout=text_layout_for(cfg["model"])), str(ckpt))
    save_config(cfg, config)
    return ckpt, config


def prepare(folder: Path, base: Path, config: Path, batch: int) -> None:
    """Write what a text cache of the base holds for one batch: the encoder's weights, the empty caption's and the
    batch's contexts."""
    node = read_model_config(config)["params"]["cond_stage"]
    encoder = load_base_text_encoder(node, base, config)
    save_file(encoder.state_dict(), str(folder / ENCODER_FILE))
    save_file(encode_captions(encoder, [""], 1), str(folder / UNCOND_FILE))
    save_file(encode_captions(encoder, captions(batch), batch), str(folder / CONTEXTS))


def step_time(folder: Path, base: Path, config: Path, batch: int, cached: bool, repeats: int = 5) -> dict:
    """Median seconds of a fine-tune's training step (forward, backward, AdamW on the U-Net) from the base file, with
    its text encoder or the cached contexts; the resident memory after the steps."""
    node = read_model_config(config)
    node["params"].update(base_ckpt=str(base), base_config=str(config))
    extra = {"cond_stage": cached_text_stage(node["params"]["cond_stage"], str(folder))} if cached else {}
    with params_on_meta():
        system = instantiate_from_config(node, "model", **extra)
    prepare_weights(system)  # the base's weights, as a new run starts (a cached stand-in keeps its own)
    system.train().cond_stage_model.eval()
    result = timed_steps(system, folder / CONTEXTS if cached else None, batch, LATENT, lr=1e-5, repeats=repeats)
    return {**result, "rss_after_mib": psutil.Process().memory_info().rss / MIB}
