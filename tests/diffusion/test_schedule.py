"""Noise schedules, σ ↔ t, SNR, zero terminal SNR, and the timestep / σ spacings samplers use."""

import math

import pytest
import torch

from ldm.core.config import ConfigError, instantiate_from_config
from ldm.diffusion.schedule import (
    ZERO_SNR_ALPHA_CUMPROD,
    VPSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)
from ldm.diffusion.spacing import get_timesteps, karras_sigmas

T = 1000


# ----------------------------------------------------------------------------------------- betas


def test_scaled_linear_is_ldm_linear_with_sd_endpoints():
    betas = make_betas("linear")
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.equal(betas, make_betas("scaled_linear"))
    # linear in sqrt(β): constant differences of the square roots
    diffs = betas.sqrt().diff()
    assert torch.allclose(diffs, diffs.mean().expand_as(diffs), rtol=1e-6)


def test_sqrt_linear_is_diffusers_linear():
    betas = make_betas("sqrt_linear", linear_start=1e-4, linear_end=0.02)
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, T, dtype=torch.float64))


def test_stable_diffusion_sigma_range():
    # k-diffusion's CompVisDenoiser reports σ_min ≈ 0.0292 and σ_max ≈ 14.6146 for SD's schedule.
    schedule = VPSchedule("linear")
    assert schedule.sigma_min.item() == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max.item() == pytest.approx(14.6146, abs=1e-3)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(1 / (1 + 14.6146**2), rel=1e-3)


def test_cosine_matches_closed_form():
    s = 8e-3
    betas = make_betas("cosine", cosine_s=s)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    unclipped = betas < 0.999
    assert torch.allclose(alphas_cumprod[unclipped], f[unclipped], rtol=1e-9)
    assert betas.max() <= 0.999 and (betas.diff() >= 0).all()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")


# ------------------------------------------------------------------------------ zero terminal SNR


def test_rescale_zero_terminal_snr():
    betas = make_betas("linear")
    rescaled = rescale_zero_terminal_snr(betas)
    old, new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert new[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert new[0].item() == pytest.approx(old[0].item(), rel=1e-9)
    # sqrt(ᾱ) is an affine map of the old one (Lin et al., Algorithm 1)
    a, b = old.sqrt(), new.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    assert torch.allclose(b, (a - a[-1]) * slope, atol=1e-12)
    assert ((rescaled >= 0) & (rescaled <= 1)).all() and rescaled[-1].item() == pytest.approx(1.0)


def test_zero_terminal_snr_schedule_has_finite_sigma_max():
    schedule = VPSchedule("linear", zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert schedule.sqrt_alphas_cumprod[-1].item() == 0.0
    expected = math.sqrt((1 - ZERO_SNR_ALPHA_CUMPROD) / ZERO_SNR_ALPHA_CUMPROD)  # ≈ 4096
    assert schedule.sigma_max.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(schedule.sigmas).all() and (schedule.sigmas.diff() > 0).all()
    assert schedule.snr(schedule.sigma_max).item() == pytest.approx(ZERO_SNR_ALPHA_CUMPROD, rel=1e-3)


# ------------------------------------------------------------------------------------- σ ↔ t, SNR


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_sigma_t_round_trip(kind):
    schedule = VPSchedule(kind)
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0])
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-3)
    ints = torch.arange(T)
    assert torch.allclose(schedule.t_to_sigma(ints.float()), schedule.sigmas, rtol=1e-5)
    assert torch.allclose(schedule.sigma_to_t(schedule.sigmas), ints.float(), atol=1e-3)


def test_sigma_to_t_interpolates_log_sigma_and_clamps():
    schedule = VPSchedule("linear")
    mid = (schedule.log_sigmas[10] * 0.3 + schedule.log_sigmas[11] * 0.7).exp()
    assert schedule.sigma_to_t(mid).item() == pytest.approx(10.7, abs=1e-3)
    assert schedule.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, T - 1]
    grid = torch.full((2, 3), 1.0)
    assert schedule.sigma_to_t(grid).shape == (2, 3)


def test_snr_and_vp_coefficients_of_a_noise_level():
    schedule = VPSchedule("linear")
    t = torch.tensor([0, 10, 999])
    ac = schedule.alphas_cumprod[t]
    sigma = schedule.sigmas[t]
    assert torch.allclose(schedule.snr(sigma), ac / (1 - ac), rtol=1e-4)  # 1 − ᾱ in fp32 at t = 0: ~3e-5
    alpha, sigma_t = schedule.alpha_sigma(sigma)  # the table's own sqrt(ᾱ), sqrt(1 − ᾱ)
    assert torch.allclose(alpha, schedule.sqrt_alphas_cumprod[t], rtol=1e-6)
    assert torch.allclose(sigma_t, schedule.sqrt_one_minus_alphas_cumprod[t], rtol=1e-6)


def test_timestep_is_the_exact_integer_at_every_table_sigma_and_continuous_between():
    schedule = VPSchedule("linear", zero_terminal_snr=True)
    ints = torch.arange(T)
    assert torch.equal(schedule.timestep(schedule.sigmas), ints.float())
    between = schedule.t_to_sigma(torch.tensor([10.4, 500.5]))
    assert torch.allclose(schedule.timestep(between), torch.tensor([10.4, 500.5]), atol=1e-3)


def test_training_draws_timesteps_uniformly_from_the_table():
    schedule = VPSchedule("linear")
    g = torch.Generator().manual_seed(0)
    sigma = schedule.sample_sigmas(20000, g)
    t = schedule.timestep(sigma)
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= T - 1
    counts = torch.bincount(t.long(), minlength=T).float()  # 20 per timestep on average
    assert counts.mean() == 20 and counts.std() < 6  # Poisson(20): std ≈ 4.5
    # the same draws as DDPM's randint over timesteps with the same generator
    expected = torch.randint(0, T, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(t.long(), expected)


def test_buffers_follow_ldm_names_and_stay_out_of_state_dict():
    schedule = VPSchedule("linear")
    names = dict(schedule.named_buffers())
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sigmas"):
        assert names[name].shape == (T,) and names[name].dtype == torch.float32
    assert schedule.state_dict() == {}
    assert torch.allclose(schedule.sqrt_alphas_cumprod**2 + schedule.sqrt_one_minus_alphas_cumprod**2, torch.ones(T))
    rebuilt = VPSchedule.from_betas(schedule.betas)
    assert torch.allclose(rebuilt.sigmas, schedule.sigmas, rtol=1e-5)


def test_schedule_builds_from_config():
    node = {"target": "ldm.diffusion.schedule.VPSchedule",
            "params": {"kind": "cosine", "num_timesteps": 100, "zero_terminal_snr": True}}
    schedule = instantiate_from_config(node)
    assert schedule.num_timesteps == 100 and schedule.alphas_cumprod[-1] == 0
    with pytest.raises(ConfigError):
        instantiate_from_config({**node, "params": {"kind": "squaredcos"}})


# ---------------------------------------------------------------------------------------- spacings
# Expected lists are diffusers' DDIMScheduler.set_timesteps for num_train_timesteps=1000:
#   leading:  arange(n) * (1000 // n), reversed, + steps_offset (SD: 1)
#   trailing: round(arange(1000, 0, -1000 / n)) - 1
#   linspace: round(linspace(0, 999, n)), reversed


def test_leading_spacing_with_sd_offset():
    assert get_timesteps(T, 10, "leading").tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    fifty = get_timesteps(T, 50, "leading").tolist()
    assert fifty[:3] == [981, 961, 941] and fifty[-1] == 1 and len(fifty) == 50
    assert get_timesteps(T, 10, "leading", steps_offset=0).tolist()[0] == 900
    with pytest.raises(ValueError, match="outside"):
        get_timesteps(T, 1000, "leading")  # 1 … 1000 would index past t = 999


def test_trailing_spacing():
    assert get_timesteps(T, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    fifty = get_timesteps(T, 50, "trailing").tolist()
    assert fifty[:3] == [999, 979, 959] and fifty[-1] == 19
    assert get_timesteps(T, 3, "trailing").tolist() == [999, 666, 332]  # 1000/3 = 333.3…, rounded
    assert get_timesteps(T, T, "trailing").tolist() == list(range(T - 1, -1, -1))


def test_linspace_spacing():
    assert get_timesteps(T, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # 999/49 = 20.387…: 48·20.387 = 978.6 → 979, 47·20.387 = 958.2 → 958, 46·20.387 = 937.8 → 938
    fifty = get_timesteps(T, 50, "linspace").tolist()
    assert fifty[:4] == [999, 979, 958, 938] and fifty[-2:] == [20, 0]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_get_sigmas_reads_the_schedule_at_the_timesteps(spacing):
    schedule = VPSchedule("linear")
    sigmas = schedule.ladder(10, spacing)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert torch.equal(sigmas[:-1], schedule.sigmas[get_timesteps(T, 10, spacing)])


def test_karras_sigmas():
    schedule = VPSchedule("linear")
    sigmas = schedule.ladder(10, "karras")
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert sigmas[0].item() == pytest.approx(schedule.sigma_max.item(), rel=1e-5)
    assert sigmas[-2].item() == pytest.approx(schedule.sigma_min.item(), rel=1e-5)
    steps = (sigmas[:-1].double() ** (1 / 7)).diff()  # linear in σ^(1/ρ), ρ = 7
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
    assert torch.allclose(karras_sigmas(3, 1.0, 16.0, rho=1.0), torch.tensor([16.0, 8.5, 1.0], dtype=torch.float64))
