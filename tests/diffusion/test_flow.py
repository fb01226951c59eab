"""Rectified flow through the same stack as VP diffusion: exact velocities on Gaussian data, the VE Euler step is the
flow's Euler step, SD3's time distributions and shift, CFG and rescale on velocities, and the flow objective."""

import math

import pytest
import torch

from ldm.diffusion import DiffusionObjective, FlowSchedule, cfg_denoiser, sample
from ldm.diffusion.denoiser import Denoiser, append_dims
from ldm.diffusion.flow import shift_t
from ldm.diffusion.parameterization import PARAMETERIZATIONS
from ldm.diffusion.sampling import sample_euler
from tests.components import shared_run_pipeline, tiny_pipeline
from tests.gaussian_data import MEAN, STD, channel_stats, ideal_model_fn, ideal_x0, sample_data

SCHEDULE = FlowSchedule()
SHAPE = (2, 8, 8)
N = 250
MEAN_TOL = 0.035


def _noise(n, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,steps,std_tol", [("euler", 50, 0.05), ("heun", 20, 0.03), ("dpmpp_2m", 20, 0.03),
                                                ("ddim", 50, 0.05)])
def test_exact_velocity_samples_the_data_moments(name, steps, std_tol):
    denoiser = Denoiser(ideal_model_fn(SCHEDULE, "flow"), SCHEDULE, "flow")
    result = sample(name, denoiser, _noise(N), SCHEDULE, steps)
    mean, std = channel_stats(result.x)
    assert ((mean - MEAN) / STD).abs().max() < MEAN_TOL
    assert (std / STD - 1).abs().max() < std_tol
    assert result.sigmas[0].item() == pytest.approx(SCHEDULE.sigma_max.item()) and result.sigmas[-1] == 0


def test_the_denoiser_recovers_the_ideal_x0_from_an_exact_velocity():
    x = _noise(8) * 3.0
    for sigma in (0.05, 1.0, 30.0):
        x0 = Denoiser(ideal_model_fn(SCHEDULE, "flow"), SCHEDULE, "flow")(x, torch.tensor(sigma))
        assert torch.allclose(x0, ideal_x0(x, torch.full((8,), sigma)), atol=1e-4, rtol=1e-4)


def test_a_ve_euler_step_is_the_rectified_flow_euler_step():
    """x_{t'} = x_t + (t' − t)·v(x_t, t) (Liu et al. 2022) equals sample_euler's step σ → σ' in VE coordinates."""
    torch.manual_seed(0)
    weight = torch.randn(2, 2, 1, 1)

    def velocity(x_t, t):  # any network: a fixed linear map of x_t, modulated by t
        return torch.nn.functional.conv2d(x_t, weight) * (1 + append_dims(t, 4) / 1000)

    t, t_next = torch.tensor(0.8), torch.tensor(0.55)
    x_t = _noise(4)
    flow_step = x_t + (t_next - t) * velocity(x_t, (t * 1000).expand(4))
    sigma, sigma_next = FlowSchedule.sigma_of(t), FlowSchedule.sigma_of(t_next)
    ladder = torch.stack([sigma, sigma_next])
    x_ve = sample_euler(Denoiser(velocity, SCHEDULE, "flow"), x_t / (1 - t), ladder)
    assert torch.allclose(x_ve * (1 - t_next), flow_step, atol=1e-5)


def test_logit_normal_and_uniform_times_and_the_sd3_shift():
    g = torch.Generator().manual_seed(0)
    t = FlowSchedule("logit_normal", logit_mean=0.3, logit_std=0.8).sample_t(200_000, g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.3, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)
    u = FlowSchedule("uniform").sample_t(200_000, g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.005) and u.min() >= 0 and u.max() <= FlowSchedule().t_max
    shifted = FlowSchedule("uniform", shift=3.0).sample_t(200_000, g)
    # the shift is monotone: quantile q of the shifted draws is shift_t(q), e.g. the median 0.75 at s = 3
    assert shifted.median().item() == pytest.approx(shift_t(torch.tensor(0.5), 3.0).item(), abs=0.005) == 0.75
    assert torch.equal(shift_t(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="time_sampling"):
        FlowSchedule("cosine")


def test_ladders_are_uniform_in_t_and_shifted():
    sigmas = FlowSchedule().ladder(4)
    t = FlowSchedule.t_of(sigmas.double())
    assert torch.allclose(t, torch.linspace(FlowSchedule().t_max, 0, 5, dtype=torch.float64), atol=1e-6)
    shifted = FlowSchedule.t_of(FlowSchedule(shift=3.0).ladder(4).double())
    assert torch.allclose(shifted, shift_t(t, 3.0), atol=1e-6) and (shifted >= t).all()
    karras = FlowSchedule().ladder(10, "karras")
    assert karras[-1] == 0 and (karras.diff() < 0).all() and FlowSchedule().default_spacing("dpmpp_2m") == "linspace"


def test_cfg_and_rescale_on_velocities_follow_the_formulas():
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(3, 2, 4, 4, generator=g) * 2, torch.tensor([0.5, 1.0, 3.0])
    cond, uncond = {"shift": torch.randn(3, 1, 1, 1, generator=g)}, {"shift": torch.zeros(3, 1, 1, 1)}
    ideal = ideal_model_fn(SCHEDULE, "flow")

    def network(x_t, t, shift):
        return ideal(x_t, t) + shift * x_t.tanh()

    den = Denoiser(network, SCHEDULE, "flow")
    v_c, v_u = (den.predict(x, sigma, **c).output for c in (cond, uncond))
    guided = cfg_denoiser(den, cond, uncond, scale=4.0)(x, sigma)
    torch.testing.assert_close(den.output_for(guided, x, sigma), v_u + 4.0 * (v_c - v_u), atol=1e-4, rtol=1e-4)
    rescaled = cfg_denoiser(den, cond, uncond, scale=4.0, rescale=1.0)(x, sigma)
    v = den.output_for(rescaled, x, sigma)
    assert torch.allclose(v.std(dim=(1, 2, 3)), v_c.std(dim=(1, 2, 3)), rtol=1e-4)  # Lin et al. eq. 15 in v-space


def test_the_ideal_velocity_minimises_the_flow_objective():
    objective = DiffusionObjective(SCHEDULE, "flow")
    ideal = ideal_model_fn(SCHEDULE, "flow")
    x0 = sample_data(4000, size=2, generator=torch.Generator().manual_seed(0))

    def loss_of(model_fn):
        return objective(model_fn, x0, generator=torch.Generator().manual_seed(1)).item()

    best = loss_of(ideal)
    for perturb in (lambda out: out * 1.1, lambda out: out * 0.9, lambda out: out + 0.1, lambda out: out - 0.1):
        assert best < loss_of(lambda x_t, t: perturb(ideal(x_t, t)))


def test_flow_target_and_min_snr_weight_on_the_flow_path():
    param = PARAMETERIZATIONS["flow"]
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.rand(8, 1, 1, 1, generator=g) * 0.9 + 0.05
    alpha, sigma = 1 - t, t
    x_t = alpha * x0 + sigma * noise
    v = param.target(x0, noise, alpha, sigma)
    assert torch.allclose(v, noise - x0) and torch.allclose(param.to_x0(v, x_t, alpha, sigma), x0, atol=1e-5)
    assert torch.allclose(param.to_eps(v, x_t, alpha, sigma), noise, atol=1e-5)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    snr = (alpha**2 / sigma**2).flatten()
    weighted = param.min_snr_weight(snr, 5.0) * (param.from_x0(x0_hat, x_t, alpha, sigma) - v).pow(2).flatten(1).mean(1)
    expected = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(weighted, expected, rtol=1e-3)
    assert math.isclose(param.min_snr_weight(torch.tensor(0.0), 5.0).item(), 0.0)


def test_a_flow_run_loads_as_flow_and_the_pipeline_samples_it_on_its_own_path(toy_flow_run):
    """(Training a flow model through the driver: test_reflow.py's reflow stage, slow tier.)"""
    loaded = shared_run_pipeline(toy_flow_run)  # read only
    assert isinstance(loaded.schedule, FlowSchedule) and loaded.parameterization == "flow"
    pipe = tiny_pipeline("flow")  # what the run holds, in memory
    assert isinstance(pipe.schedule, FlowSchedule) and pipe.parameterization == "flow"
    prompts = ["a red circle on a blue background"] * 2
    draw = dict(steps=2, sampler="euler", guidance=3.0, seed=0)
    assert torch.equal(loaded.generate_tensors(prompts, **draw), pipe.generate_tensors(prompts, **draw))
    for sampler in ("euler", "heun", "dpmpp_2m", "ddim"):
        images = pipe.generate_tensors(prompts, steps=2, sampler=sampler, guidance=3.0, seed=0)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    seen = []
    pipe.generate_tensors(prompts[:1], steps=4, sampler="euler", guidance=1.0, callback=seen.append)
    t = FlowSchedule.t_of(torch.stack([info["sigma"] for info in seen]).double())
    assert torch.allclose(t, torch.linspace(FlowSchedule().t_max, 0, 5, dtype=torch.float64)[:-1], atol=1e-6)
