"""Stage-2 step time and resident memory with the frozen text encoder in the loop vs cached text embeddings.

Both sides train the same U-Net on the same latents; "encoder" builds an open_clip text tower (random weights) and
encodes the batch's captions every step, "cached" builds the ``CachedTextEncoder`` stand-in over the encoder's
weights file (memory-mapped, as training on a cache does) and takes the contexts from the batch. Each side runs in its
own process (``ldm.bench.scale.measure_in_child``), so its peak resident memory is its own.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from ldm.bench.steps import quiet_lightning
from ldm.data.text_cache import encode_captions
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import VPSchedule
from ldm.io.checkpoints import save_file_atomic
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.nets.conditioning.openclip import FrozenOpenCLIP
from ldm.nets.unet.model import UNetModel
from ldm.systems.latent_diffusion import LatentDiffusion

LATENT = (4, 16, 16)
UNET = dict(image_size=16, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32, use_spatial_transformer=True,
            transformer_depth=1, legacy=False)
WEIGHTS, UNCOND, CONTEXTS = "text_encoder.safetensors", "text_uncond.safetensors", "contexts.safetensors"


def encoder(arch: str) -> FrozenOpenCLIP:
    """The frozen open_clip text tower of ``arch`` with random weights (seeded)."""
    torch.manual_seed(0)
    return FrozenOpenCLIP(arch=arch, pretrained=None, layer="penultimate")


def captions(batch: int) -> list[str]:
    """A batch of distinct captions."""
    return [f"a photograph of object number {i} on a table" for i in range(batch)]


def prepare(folder: Path, arch: str, batch: int) -> None:
    """Write what a text cache holds for one batch: the encoder's weights, the unconditional and batch contexts."""
    folder.mkdir(parents=True, exist_ok=True)
    enc = encoder(arch)
    save_file_atomic(enc.state_dict(), folder / WEIGHTS)
    save_file_atomic(encode_captions(enc, [""], 1), folder / UNCOND)
    save_file_atomic(encode_captions(enc, captions(batch), batch), folder / CONTEXTS)


def step_time(folder: Path, arch: str, batch: int, cached: bool, repeats: int = 5) -> dict:
    """Median seconds of a training step (forward, backward, AdamW) with the encoder or the cached contexts."""
    if cached:
        cond = CachedTextEncoder(load_safetensors(str(folder / WEIGHTS)),
                                 load_safetensors(str(folder / UNCOND))["context"], lambda: encoder(arch))
    else:
        cond = encoder(arch)
    torch.manual_seed(1)
    system = LatentDiffusion(UNetModel(**UNET, context_dim=cond.context_dim), cond, DiffusionObjective(VPSchedule()),
                             cond_stage_trainable=False, ema=None, scale_factor=1.0)
    return timed_steps(system, folder / CONTEXTS if cached else None, batch, LATENT, lr=1e-4, repeats=repeats)


def timed_steps(system: LatentDiffusion, contexts: Path | None, batch: int, latent: tuple[int, ...], lr: float,
                repeats: int) -> dict:
    """Median seconds of ``system``'s training step (forward, backward, AdamW on the U-Net) on a batch of random
    latents and captions (the text encoder runs), or with the cached contexts of the file ``contexts``; the first
    step is warm-up."""
    data = {"mean": torch.randn(batch, *latent), "std": torch.rand(batch, *latent), "caption": captions(batch)}
    if contexts is not None:
        data["context"] = load_safetensors(str(contexts))["context"].float()  # (B, T, D), as a batch has it
    opt = torch.optim.AdamW(system.model.parameters(), lr=lr)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with quiet_lightning():
            system.training_step(data, i).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    text_params = sum(p.numel() for p in system.cond_stage_model.parameters())
    return {"step_s": statistics.median(times[1:]), "text_params": text_params}
