"""Toy-size real components in memory (diffusers' ``get_dummy_components``): modules, systems, Pipelines, runs.

``tiny_components(kind)`` builds the VAE, U-Net, conditioning (a text encoder or a class embedder) and objective
(schedule + parameterisation) of ``configs/tiny/ldm-<kind>.yaml`` — the very architecture the slow tier trains —
with seeded random weights and no file but that config; ``tiny_ldm`` / ``tiny_control_ldm`` make a
``LatentDiffusion`` / ``ControlLDM`` of them and ``tiny_pipeline`` a ``Pipeline``. The U-Net's zero-initialised
layers are woken (every weight nonzero), so each weight shows in what the model draws, and a kept EMA differs
from the raw weights as it would after training. Building one takes about a tenth of a second.

Where a test needs a run directory on disk (loaders, export, txt2img, resume refusals), ``write_vae_run`` and
``write_ldm_run`` / ``write_control_run`` write one from such a system as the training driver leaves it
(``config.yaml`` resolved, ``checkpoints/last.ckpt``, a ``latest`` link) — without training it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ldm.core.config import instantiate_from_config, load_config, save_config
from ldm.core.migrate import vae_network_node
from ldm.inference.loaders import load_autoencoder
from ldm.inference.pipeline import Pipeline
from ldm.io.runs import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, create_run_dir
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.nets.controlnet import ControlNet
from ldm.systems.controlnet import ControlLDM
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.training.controlnet_base import complete_model_node, load_base_weights
from tests.paths import TINY
from tests.sd_toy import randomize

KINDS = {"text": "ldm-text", "class": "ldm-class", "flow": "ldm-flow"}  # kind → configs/tiny/<name>.yaml
COMPONENTS = ("unet", "cond_stage", "objective")  # built from the stage-2 config's model node
PIXELS = 16  # the tiny configs' image size
FACTOR = 2  # the tiny VAE's downsampling factor: 16 px → 8×8 latents
HINT_CHANNELS = 3
SCALE_FACTOR = 0.9  # a stand-in for the scale a latent cache measures (1 / std of the latents)
STEP_NOISE = 0.01  # how far the raw weights move from the EMA's (a few training steps' worth)
TRAINED_STEPS = 6  # the global step written into a checkpoint (the tiny configs' max_steps)


@lru_cache(maxsize=None)
def _tiny_yaml(name: str) -> dict:
    return load_config(TINY / f"{name}.yaml")


def tiny_yaml(name: str) -> dict:
    """``configs/tiny/<name>.yaml`` loaded (a fresh copy each call)."""
    return copy.deepcopy(_tiny_yaml(name))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build under ``torch.manual_seed(seed)`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """The tiny VAE network (``configs/tiny/vae.yaml``, f = 2) with seeded random weights, frozen, in eval mode."""
    with seeded(seed):
        vae = instantiate_from_config(vae_network_node(tiny_yaml("vae")["model"]), "first_stage")
    return vae.eval().requires_grad_(False)


def tiny_components(kind: str = "text", seed: int = 0, parameterization: str | None = None) -> dict[str, nn.Module]:
    """``unet``, ``cond_stage``, ``objective`` and ``first_stage`` of ``configs/tiny/ldm-<kind>.yaml`` (kind: text,
    class or flow), seeded, every U-Net weight nonzero; ``parameterization`` (eps, v, x0) replaces the config's."""
    params = tiny_yaml(KINDS[kind])["model"]["params"]
    if parameterization is not None:
        params["objective"]["params"]["parameterization"] = parameterization
    with seeded(seed):
        built = {name: instantiate_from_config(params[name], f"model.params.{name}") for name in COMPONENTS}
    randomize(built["unet"], seed + 1).train()  # wakes its zero-initialised convolutions (output, res blocks, proj_out)
    return {**built, "first_stage": tiny_vae(seed)}


def _system_params(kind: str) -> dict:
    """The config's model params other than the components (ucg_rate, EMA decay, optimizer, …), built."""
    params = tiny_yaml(KINDS[kind])["model"]["params"]
    return {k: instantiate_from_config(v, f"model.params.{k}") if isinstance(v, dict) and "target" in v else v
            for k, v in params.items() if k not in (*COMPONENTS, "first_stage")}


def _as_if_trained(system: LatentDiffusion, seed: int) -> LatentDiffusion:
    """Move the raw weights a little away from the EMA's (which started from them), as training would."""
    if system.model_ema is not None:
        randomize(system.model, seed + 100, scale=STEP_NOISE)
    return system.eval()


def tiny_ldm(kind: str = "text", seed: int = 0, parameterization: str | None = None, use_ema: bool = True,
             components: dict[str, nn.Module] | None = None) -> LatentDiffusion:
    """A ``LatentDiffusion`` of ``tiny_components`` (or the given ones) with the tiny config's settings, a scale
    factor and image size as a cache would give, and an EMA that differs from the raw weights; eval mode."""
    components = components or tiny_components(kind, seed, parameterization)
    params = {**_system_params(kind), **({} if use_ema else {"ema": None})}
    system = LatentDiffusion(**components, **params, scale_factor=SCALE_FACTOR, image_size=PIXELS)
    return _as_if_trained(system, seed)


def wake_zero_convs(control: ControlNet, seed: int = 1, scale: float = 0.2) -> ControlNet:
    """Make the zero convolutions (and the hint block's last one) nonzero, as a trained ControlNet's are."""
    for i, part in enumerate(("zero_convs", "middle_block_out", "input_hint_block")):
        randomize(getattr(control, part), seed + i, scale=scale)
    return control


def tiny_control_ldm(seed: int = 0, trained: bool = False) -> ControlLDM:
    """A ``ControlLDM`` on the tiny text model: its ControlNet copied from the U-Net (zero convolutions zero: it draws
    what the base draws), or with ``trained`` nonzero ones that steer it; eval mode."""
    components = tiny_components("text", seed)
    control = ControlNet.from_unet(components["unet"], HINT_CHANNELS, FACTOR)
    if trained:
        wake_zero_convs(control, seed + 1)
    params = {k: v for k, v in _system_params("text").items() if k != "ema"}  # no EMA unless asked, as ControlNet
    system = ControlLDM(**components, control_stage=control, **params, scale_factor=SCALE_FACTOR, image_size=PIXELS)
    return system.eval()


@lru_cache(maxsize=None)
def shared_run_pipeline(run: Path) -> Pipeline:
    """``Pipeline.from_run(run, device="cpu")`` loaded once per test process and shared: for tests that only draw with
    it or read it (never change its weights, modules or ``source``)."""
    return Pipeline.from_run(run, device="cpu")


def tiny_pipeline(kind: str = "text", seed: int = 0, **system_options) -> Pipeline:
    """A ``Pipeline`` sharing the modules of ``tiny_ldm`` (the EMA weights swapped in, as ``from_run`` loads them)."""
    system = tiny_ldm(kind, seed, **system_options)
    if system.model_ema is not None:
        system.model_ema.copy_to(system.model)
    return Pipeline.from_system(system).to("cpu")


# ---------------------------------------------------------------------------------------------- runs on disk


def write_checkpoint(run: Path, state: dict[str, torch.Tensor], step: int = TRAINED_STEPS) -> Path:
    """``checkpoints/last.ckpt`` holding ``state`` as Lightning writes it (state_dict, global_step, epoch)."""
    ckpt = run / CHECKPOINT_DIR / LAST_CHECKPOINT
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": step, "epoch": 0}, ckpt)
    return ckpt


def write_run(root: Path, stage: str, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    """``<root>/<stage>/<name>-<time>/`` with ``config.yaml`` and a last checkpoint of ``state``; ``latest`` → it."""
    run = create_run_dir(stage, cfg.get("name") or stage, root)
    save_config(cfg, run / CONFIG_FILE)
    write_checkpoint(run, state)
    return run


def write_vae_run(root: Path, seed: int = 0) -> Path:
    """A stage-1 run of ``configs/tiny/vae.yaml`` whose checkpoint holds ``tiny_vae(seed)`` (and a discriminator)."""
    cfg = tiny_yaml("vae")
    with seeded(seed):
        system = instantiate_from_config(cfg["model"], "model")
    system.load_state_dict(tiny_vae(seed).state_dict(), strict=False)  # the VAE's weights; the loss's stay as built
    return write_run(root, "vae", cfg, system.state_dict())


def ldm_run_config(kind: str, vae_run: Path, cache_dir: Path | None = None, *overrides: str) -> dict:
    """``configs/tiny/ldm-<kind>.yaml`` naming ``vae_run`` (and ``cache_dir``), as a run's config.yaml holds it."""
    extra = [f"cache.dir={cache_dir}"] if cache_dir is not None else []
    return load_config(TINY / f"{KINDS[kind]}.yaml", [f"cache.vae={vae_run}", *extra, *overrides])


def vae_of_run(vae_run: Path) -> AutoencoderKL:
    """The VAE network of a stage-1 run, loaded as stage 2 loads it."""
    return load_autoencoder(vae_run)[0]


def write_ldm_run(root: Path, vae_run: Path, kind: str = "text", seed: int = 0,
                  cache_dir: Path | None = None) -> Path:
    """A stage-2 run of ``configs/tiny/ldm-<kind>.yaml`` on ``vae_run``: ``tiny_ldm(kind, seed)``, that run's VAE."""
    components = {**tiny_components(kind, seed), "first_stage": vae_of_run(vae_run)}
    system = tiny_ldm(kind, seed, components=components)
    return write_run(root, "ldm", ldm_run_config(kind, vae_run, cache_dir), system.state_dict())


def write_control_run(root: Path, ldm_run: Path, vae_run: Path, seed: int = 0, trained: bool = True) -> Path:
    """A ControlNet run of ``configs/tiny/controlnet.yaml`` on the stage-2 run ``ldm_run``: the base's weights (its
    EMA U-Net), a ControlNet copied from that U-Net, with nonzero zero convolutions when ``trained``."""
    cfg = load_config(TINY / "controlnet.yaml", [f"model.params.base={ldm_run}", f"cache.vae={vae_run}"])
    complete_model_node(cfg["model"])
    system = instantiate_from_config(cfg["model"], "model", first_stage=vae_of_run(vae_run))
    load_base_weights(system)
    if trained:
        wake_zero_convs(system.control_model, seed + 1)
    return write_run(root, "controlnet", cfg, system.state_dict())
