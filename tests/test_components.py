"""tests/components.py, the in-memory toy components: seeded, real modules of the tiny configs, every weight in use,
systems and Pipelines built from them directly, and runs written from them that load back to the same model."""

import time

import pytest
import torch

from ldm.diffusion import FlowSchedule, VPSchedule
from ldm.inference.pipeline import Pipeline
from ldm.io.checkpoints import EMA_PREFIX, load_file, state_dict_of
from ldm.io.runs import run_config
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.nets.conditioning.embedders import ClassEmbedder
from ldm.nets.conditioning.text import TextTransformer
from ldm.nets.unet.model import UNetModel
from ldm.systems.controlnet import ControlLDM
from ldm.systems.latent_diffusion import LatentDiffusion
from tests.components import (
    PIXELS,
    SCALE_FACTOR,
    shared_run_pipeline,
    tiny_components,
    tiny_yaml,
    tiny_control_ldm,
    tiny_ldm,
    tiny_pipeline,
)

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
FAST = dict(steps=2, sampler="euler", guidance=3.0, seed=0)
BUILD_BUDGET_S = 5.0  # a build takes ~0.1 s on a quiet core; the bound only catches a factory that trains or loads
TOKEN_TABLE = 49408 * 32  # the text encoder's CLIP-vocabulary token table (the tokenizer fixes its rows)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind, cond, schedule", [("text", TextTransformer, VPSchedule),
                                                  ("class", ClassEmbedder, VPSchedule),
                                                  ("flow", TextTransformer, FlowSchedule)])
def test_components_are_the_tiny_configs_modules_built_in_memory(kind, cond, schedule):
    start = time.perf_counter()
    parts = tiny_components(kind)
    assert time.perf_counter() - start < BUILD_BUDGET_S
    assert isinstance(parts["unet"], UNetModel) and isinstance(parts["cond_stage"], cond)
    assert isinstance(parts["first_stage"], AutoencoderKL) and isinstance(parts["objective"].schedule, schedule)
    unet = tiny_yaml(f"ldm-{kind}")["model"]["params"]["unet"]["params"]
    assert parts["unet"].model_channels == unet["model_channels"] and parts["unet"].in_channels == 4
    assert parts["first_stage"].downsampling_factor == 2
    # toy size: the U-Net at the narrowest width its 32 GroupNorm groups allow, the VAE far smaller
    assert n_params(parts["unet"]) < 1_000_000 and n_params(parts["first_stage"]) < 100_000
    assert n_params(parts["cond_stage"]) - (TOKEN_TABLE if cond is TextTransformer else 0) < 50_000
    # every weight nonzero: zero-initialised output convolutions too, so each one shows in what is drawn
    assert all(p.abs().min() > 0 for p in parts["unet"].out.parameters())


def test_seeded_reproducible_and_the_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_components("text", seed=0), tiny_components("text", seed=0), tiny_components("text", seed=1)
    assert torch.equal(torch.rand(1), before)  # building drew nothing from the caller's generator
    for name in ("unet", "cond_stage", "first_stage"):
        assert same_state(a[name], b[name]) and not same_state(a[name], c[name]), name


def test_a_system_from_components_is_the_public_layout_with_an_ema_that_differs():
    system = tiny_ldm("text")
    assert isinstance(system, LatentDiffusion) and not system.training
    assert system.scale_factor.item() == pytest.approx(SCALE_FACTOR) and int(system.image_size) == PIXELS
    state = system.state_dict()
    for prefix in ("model.diffusion_model.", "first_stage_model.encoder.", "cond_stage_model.", EMA_PREFIX):
        assert any(k.startswith(prefix) for k in state), prefix
    raw = system.model.diffusion_model.out[2].weight
    shadow = state[EMA_PREFIX + "diffusion_model.out.2.weight".replace(".", "")]
    assert not torch.equal(raw, shadow) and (raw - shadow).abs().max() < 0.1  # near, as after a few steps
    assert system.parameterization == "eps" and tiny_ldm("text", parameterization="v").parameterization == "v"


def test_a_pipeline_from_components_draws_prompts_and_labels():
    text = tiny_pipeline("text")
    images = text.generate_tensors(PROMPTS, **FAST)
    assert images.shape == (2, 3, PIXELS, PIXELS) and torch.isfinite(images).all()
    assert (images[0] - images[1]).abs().amax() > 0.01
    other = text.generate_tensors([PROMPTS[1], PROMPTS[1]], **FAST)
    assert (other[0] - images[0]).abs().amax() > 1e-4  # the prompt steers the model (every weight in use)
    labels = tiny_pipeline("class")
    assert labels.condition_key == "label" and labels.n_classes == 168
    assert labels.generate_tensors([3, 5], **FAST).shape == (2, 3, PIXELS, PIXELS)


def test_a_controlnet_system_starts_as_its_base_and_a_trained_one_steers_it():
    base, fresh, trained = tiny_ldm("text", use_ema=False), tiny_control_ldm(), tiny_control_ldm(trained=True)
    assert isinstance(fresh, ControlLDM) and not fresh.training
    assert same_state(fresh.model, base.model)  # the same components (seed): the ControlNet's base is tiny_ldm's
    x, t, hint = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.rand(2, 3, PIXELS, PIXELS)
    with torch.no_grad():
        context = fresh.cond_stage_model(PROMPTS)
        plain = base.model(x, t, context)
        assert torch.equal(fresh.network()(x, t, context=context, hint=hint), plain)
        assert (trained.network()(x, t, context=context, hint=hint) - plain).abs().amax() > 1e-3
    pipe = Pipeline.from_system(trained)
    assert pipe.control_model is trained.control_model
    assert pipe.generate_tensors(PROMPTS, control=hint, **FAST).shape == (2, 3, PIXELS, PIXELS)


def test_written_runs_hold_the_in_memory_systems(toy_ldm_run, toy_vae_run, toy_controlnet_run):
    cfg = run_config(toy_ldm_run)
    assert cfg["model"]["params"]["first_stage"] == str(toy_vae_run) and cfg["cache"]["vae"] == str(toy_vae_run)
    state = state_dict_of(load_file(toy_ldm_run / "checkpoints" / "last.ckpt"))
    memory = tiny_ldm("text").state_dict()
    assert state.keys() == memory.keys() and all(torch.equal(state[k], memory[k]) for k in memory)
    loaded = shared_run_pipeline(toy_ldm_run)  # read only
    drawn = tiny_pipeline("text").generate_tensors(PROMPTS, **FAST)
    assert torch.equal(loaded.generate_tensors(PROMPTS, **FAST), drawn)
    control = Pipeline.from_run(toy_controlnet_run, device="cpu")
    assert control.control_model is not None
    assert all(torch.equal(p, q) for p, q in zip(control.model.parameters(), loaded.model.parameters()))  # its base
