"""Image-to-image and inpainting in the sampling core, on the exact Gaussian denoiser (ldm.diffusion.editing).

Strength 1 is text-to-image and strength 0 the known latents themselves, for every sampler and for ε, v and flow
models; in between the ladder's tail runs as diffusers' img2img ``get_timesteps`` picks it; an exact denoiser
started from data noised to any level returns data (SDEdit keeps the distribution); inpainting keeps the known
region exactly and draws the repainted one as text-to-image does (the exact denoiser's pixels are independent).
"""

import pytest
import torch

from ldm.diffusion import SAMPLERS, FlowSchedule, VPSchedule, sample
from ldm.diffusion.editing import first_step
from tests.gaussian_data import MEAN, STD, FunctionDenoiser, channel_stats, ideal_x0, sample_data

MODELS = {"eps": (VPSchedule, "eps"), "v": (VPSchedule, "v"), "flow": (FlowSchedule, "flow")}
SIZE = 4


def exact(model: str) -> FunctionDenoiser:
    schedule_cls, parameterization = MODELS[model]
    return FunctionDenoiser(ideal_x0, schedule_cls(), parameterization)


def draw(denoiser, name, noise, steps, **edit):
    return sample(name, denoiser, noise, denoiser.schedule, steps, generator=torch.Generator().manual_seed(1), **edit)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_strength_one_is_text_to_image_and_zero_the_known_latents(model, name):
    denoiser = exact(model)
    g = torch.Generator().manual_seed(0)
    init, noise = sample_data(3, SIZE, g), torch.randn(3, 2, SIZE, SIZE, generator=g)
    plain = draw(denoiser, name, noise, 6)
    full = draw(denoiser, name, noise, 6, init=init, strength=1.0)
    assert torch.equal(full.x, plain.x) and full.nfe == plain.nfe
    none = draw(denoiser, name, noise, 6, init=init, strength=0.0)
    assert torch.equal(none.x, init) and none.nfe == 0


@pytest.mark.parametrize("steps, strength, runs", [(10, 0.55, 5), (10, 0.8, 8), (20, 0.99, 19), (3, 0.2, 0),
                                                   (50, 0.3, 15)])
def test_the_ladder_tail_is_diffusers_get_timesteps(steps, strength, runs):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.set_timesteps(steps)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.__new__(diffusers.StableDiffusionImg2ImgPipeline)
    object.__setattr__(pipe, "scheduler", scheduler)  # get_timesteps reads nothing else
    timesteps, count = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    assert count == runs == steps - first_step(steps, strength)
    denoiser = exact("eps")
    init, noise = sample_data(1, SIZE), torch.randn(1, 2, SIZE, SIZE)
    result = draw(denoiser, "ddim", noise, steps, init=init, strength=strength)
    ladder = denoiser.schedule.ladder(steps, "leading")
    assert result.nfe == runs and torch.equal(result.sigmas, ladder[steps - runs:])
    assert torch.equal(denoiser.schedule.timestep(result.sigmas[:-1]).long(), timesteps)  # DDIM's own timesteps


@pytest.mark.parametrize("model", list(MODELS))
def test_img2img_from_data_keeps_the_data_distribution(model):
    """An exact denoiser's ODE carries data noised to σ back to data: the samples keep its mean and std."""
    denoiser = exact(model)
    g = torch.Generator().manual_seed(2)
    init = sample_data(256, SIZE, g)
    noise = torch.randn(init.shape, generator=g)
    result = draw(denoiser, "euler", noise, 40, init=init, strength=0.6)
    mean, std = channel_stats(result.x)
    assert torch.allclose(mean, MEAN, atol=0.06) and torch.allclose(std, STD, rtol=0.06)
    moved = (result.x - init).abs().mean()
    assert moved > 0.3  # noised to σ at 60 % of the ladder: not the init back


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "ddim", "ddpm", "dpmpp_2m"])
def test_inpainting_keeps_the_known_region_and_draws_the_rest_as_text_to_image(model, name):
    denoiser = exact(model)
    g = torch.Generator().manual_seed(3)
    init = sample_data(512, SIZE, g)
    noise = torch.randn(init.shape, generator=g)
    keep = torch.zeros(1, 1, SIZE, SIZE)
    keep[..., :, : SIZE // 2] = 1  # keep the left half, repaint the right
    result = draw(denoiser, name, noise, 30, init=init, keep=keep)
    left, right = result.x[..., : SIZE // 2], result.x[..., SIZE // 2:]
    torch.testing.assert_close(left, init[..., : SIZE // 2], atol=1e-5, rtol=0)
    assert (right - init[..., SIZE // 2:]).abs().mean() > 0.3
    # the exact denoiser of independent pixels: the known half tells nothing about the other, which is drawn as
    # text-to-image draws it from the same noise (the data distribution, up to the sampler's own error)
    plain = draw(denoiser, name, noise, 30).x[..., SIZE // 2:]
    torch.testing.assert_close(right, plain, atol=1e-4, rtol=0)


def test_inpainting_the_whole_image_is_text_to_image_and_keeping_it_all_is_the_image():
    denoiser = exact("eps")
    init, noise = sample_data(2, SIZE), torch.randn(2, 2, SIZE, SIZE)
    plain = draw(denoiser, "dpmpp_2m", noise, 8)
    repaint_all = draw(denoiser, "dpmpp_2m", noise, 8, init=init, keep=torch.zeros(1, 1, SIZE, SIZE))
    keep_all = draw(denoiser, "dpmpp_2m", noise, 8, init=init, keep=torch.ones(1, 1, SIZE, SIZE))
    assert torch.equal(repaint_all.x, plain.x) and torch.equal(keep_all.x, init)
