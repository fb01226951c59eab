"""Toy-size Stable Diffusion / ControlNet models with the public key structure, for checkpoint tests.

``tiny_config(name)`` is ``configs/sd/<name>.yaml`` with the widths shrunk by overrides (same modules, same key
names, a few hundred thousand parameters); ``tiny_system`` builds one with random weights (zero-initialised
layers included, so every tensor matters); ``public_state`` writes its state dict as a public SD file would
hold it (HF-named SD1 text encoder, schedule buffers, an EMA copy, no ``scale_factor``).
"""

from __future__ import annotations

import copy
import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ldm.core.config import load_config, save_config
from ldm.core.images import to_pil
from ldm.data.shapes import ShapesDataset
from ldm.inference.export import public_state_dict
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import SD_CONFIG_DIR, build_sd
from ldm.io.checkpoints import UNET_PREFIX, ema_shadow_key

P = "model.params."
UNET = {"model_channels": 32, "channel_mult": "[1,2]", "num_res_blocks": 1, "context_dim": 32}
VAE = {"ch": 32, "ch_mult": "[1,2]", "num_res_blocks": 1}
TEXT_CFG = "{width: 32, heads: 2, layers: 3}"
PIXELS = 16  # f = 2 → 8×8 latents
SD_SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def _net_overrides(prefix: str, sd2: bool) -> list[str]:
    heads = ["num_head_channels=16"] if sd2 else ["num_heads=2"]
    return [f"{prefix}{k}={v}" for k, v in UNET.items()] + [f"{prefix}{h}" for h in heads]


def tiny_overrides(name: str) -> list[str]:
    """Dotlist overrides that shrink ``configs/sd/<name>.yaml`` to toy size."""
    sd2 = name.startswith("v2")
    out = _net_overrides(f"{P}unet.params.", sd2)
    out += [f"{P}first_stage.params.ddconfig.{k}={v}" for k, v in VAE.items()]
    out += [f"{P}cond_stage.params.text_cfg={TEXT_CFG}", f"{P}image_size={PIXELS}"]
    if name.startswith("controlnet"):
        out += _net_overrides(f"{P}control_stage.params.", sd2) + [f"{P}control_stage.params.downsampling_factor=2"]
    return out


@functools.cache
def _tiny_config(name: str) -> dict:
    return load_config(SD_CONFIG_DIR / f"{name}.yaml", tiny_overrides(name))


def tiny_config(name: str) -> dict:
    """``configs/sd/<name>.yaml`` at toy size, as a loaded config dict (a fresh copy each call)."""
    return copy.deepcopy(_tiny_config(name))


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add small noise to every parameter (zero-initialised layers too, so each weight shows in outputs)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)  # keeps norms near 1, wakes zero-initialised convs
    return module.eval()


def tiny_system(name: str = "v1-inference", seed: int = 0, control: bool = False):
    """A toy SD (or ControlLDM) system with random weights, in eval mode."""
    return randomize(build_sd(tiny_config(name), control=control), seed)


@functools.cache
def shared_tiny_system(name: str = "v1-inference", seed: int = 0):
    """``tiny_system(name, seed)`` built once per test process, for tests that only read it (never change it)."""
    return tiny_system(name, seed)


@functools.cache
def shared_file_pipeline(ckpt, config) -> Pipeline:
    """The Pipeline of an SD file and its config, loaded once per test process and shared: for tests that only draw
    with it (``file_pipeline`` gives a copy to change)."""
    return _file_pipeline(ckpt, config)


@functools.cache
def _as_loaded(ckpt, config) -> dict[str, dict[str, torch.Tensor]]:
    """The shared Pipeline's U-Net and text weights as loaded, before any LoRA is folded into them."""
    pipe = shared_file_pipeline(ckpt, config)
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("model", "cond_stage_model")}


@contextmanager
def lora_folded(ckpt, config, lora: Path | None) -> Iterator[Pipeline]:
    """``shared_file_pipeline`` with the LoRA file ``lora`` folded into its weights (None: as loaded); its weights and
    ``source`` are put back after, so the tests that only read it still see the file."""
    pipe, loaded = shared_file_pipeline(ckpt, config), _as_loaded(ckpt, config)
    source = copy.deepcopy(pipe.source)
    try:
        yield pipe.with_lora(lora) if lora is not None else pipe
    finally:
        for name, state in loaded.items():
            getattr(pipe, name).load_state_dict(state, strict=True)
        pipe.source = source


def public_state(system, ema_seed: int | None = 1, hf_text: bool = True) -> dict[str, torch.Tensor]:
    """``system``'s weights as a public SD file holds them; with ``ema_seed`` an EMA copy that differs."""
    state = {k: v.clone() for k, v in system.state_dict().items() if k not in ("scale_factor", "image_size")}
    if ema_seed is not None:
        g = torch.Generator().manual_seed(ema_seed)
        for key in [k for k in state if k.startswith(UNET_PREFIX)]:
            state[ema_shadow_key(key)] = state[key] + torch.randn(state[key].shape, generator=g) * 0.05
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    state = public_state_dict(state, text_layout="hf" if hf_text else "openclip")
    for key in SD_SCHEDULE_KEYS:  # latent-diffusion's buffers (their values do not matter here, shapes do)
        state[key] = getattr(system.schedule, key, system.schedule.betas).clone()
    if hf_text:
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def ema_unet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net weights (bare keys) a loader should pick from ``public_state``: the EMA copy."""
    return {k[len(UNET_PREFIX):]: state[ema_shadow_key(k)] for k in state if k.startswith(UNET_PREFIX)}


@functools.cache
def _public_sd_state(name: str, seed: int, ema_seed: int | None) -> dict[str, torch.Tensor]:
    """``public_state`` of ``tiny_system(name, seed)``, made once per test process (only ever saved, never changed)."""
    return public_state(tiny_system(name, seed), ema_seed, hf_text=name.startswith("v1"))  # SD 2: open_clip


def write_sd_file(folder, name: str = "v1-inference", seed: int = 0, ema_seed: int | None = 1) -> tuple:
    """A toy SD file in the public layout and its inference config, written under ``folder``: (ckpt, config)."""
    ckpt, config = folder / f"toy-{name}-{seed}.safetensors", folder / f"toy-{name}.yaml"
    save_file(_public_sd_state(name, seed, ema_seed), str(ckpt))
    save_config(tiny_config(name), config)
    return ckpt, config


def write_image_folder(folder, count: int = 8, size: int = PIXELS, seed: int = 0):
    """``count`` captioned shapes images as a folder (PNG files + metadata.jsonl); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(size=size, length=count, seed=seed)
    lines = []
    for i in range(count):
        item = data[i]
        to_pil(item["image"][None])[0].save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": item["caption"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@functools.cache
def _file_pipeline(ckpt, config) -> Pipeline:
    return Pipeline.from_checkpoint(ckpt, config, device="cpu")


def file_pipeline(ckpt, config) -> Pipeline:
    """A copy of the Pipeline of an SD file and its config, loaded once per test process."""
    return copy.deepcopy(_file_pipeline(ckpt, config))
