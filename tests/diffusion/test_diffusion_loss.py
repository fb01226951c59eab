"""Parameterisations (eps / v / x0), min-SNR-γ weights and the training objective."""

import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.parameterization import PARAMETERIZATIONS, get_parameterization
from ldm.diffusion.schedule import VPSchedule
from tests.gaussian_data import ideal_model_fn, sample_data

NAMES = ["eps", "v", "x0"]
DDPM_SCHEDULE = dict(kind="sqrt_linear", linear_start=1e-4, linear_end=0.02)


def _vp_point(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)
    ac = torch.rand(b, 1, 1, 1, generator=g) * 0.98 + 0.01  # ᾱ in (0.01, 0.99)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return x0, noise, alpha, sigma, alpha * x0 + sigma * noise


# ------------------------------------------------------------------------------- parameterisations


@pytest.mark.parametrize("name", NAMES)
def test_target_round_trips_to_x0_and_eps(name):
    param = PARAMETERIZATIONS[name]
    x0, noise, alpha, sigma, x_t = _vp_point()
    target = param.target(x0, noise, alpha, sigma)
    assert torch.allclose(param.to_x0(target, x_t, alpha, sigma), x0, atol=1e-5)
    assert torch.allclose(param.to_eps(target, x_t, alpha, sigma), noise, atol=1e-5)
    assert torch.allclose(param.from_x0(x0, x_t, alpha, sigma), target, atol=1e-4)


def test_v_is_alpha_eps_minus_sigma_x0():
    x0, noise, alpha, sigma, _ = _vp_point()
    assert torch.allclose(PARAMETERIZATIONS["v"].target(x0, noise, alpha, sigma), alpha * noise - sigma * x0)
    assert get_parameterization("eps") is PARAMETERIZATIONS["eps"]
    with pytest.raises(ValueError, match="unknown parameterization"):
        get_parameterization("epsilon")


def test_min_snr_weights():
    snr, gamma = torch.tensor([0.0, 1.0, 5.0, 10.0]), 5.0
    eps, v, x0 = (PARAMETERIZATIONS[n].min_snr_weight(snr, gamma) for n in NAMES)
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 1.0, 0.5]))  # min(snr, γ)/snr, 1 at snr = 0
    assert torch.allclose(v, torch.tensor([0.0, 0.5, 5 / 6, 5 / 11]))  # min(snr, γ)/(snr + 1)
    assert torch.allclose(x0, torch.tensor([0.0, 1.0, 5.0, 5.0]))  # min(snr, γ)


def test_min_snr_weighted_mse_is_the_same_x0_objective_in_every_parameterisation():
    # One x0 error seen through each parameterisation, weighted, is min(SNR, γ)·‖x0 − x̂0‖² in all three.
    x0, noise, alpha, sigma, x_t = _vp_point(b=8, seed=1)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    snr = (alpha**2 / sigma**2).flatten()
    expected = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    for name in NAMES:
        param = PARAMETERIZATIONS[name]
        out, target = param.from_x0(x0_hat, x_t, alpha, sigma), param.target(x0, noise, alpha, sigma)
        weighted = param.min_snr_weight(snr, 5.0) * (out - target).pow(2).flatten(1).mean(1)
        assert torch.allclose(weighted, expected, rtol=1e-3), name


# -------------------------------------------------------------------------------------------- loss


def test_loss_is_a_finite_scalar_and_trains():
    objective = DiffusionObjective(VPSchedule("linear"), "eps")
    weight = torch.nn.Parameter(torch.zeros(()))
    seen = {}

    def model_fn(x_t, t, context):
        seen.update(t=t, context=context)
        return weight * x_t

    x0 = torch.randn(6, 4, 8, 8)
    loss = objective(model_fn, x0, {"context": torch.ones(6, 2, 3)})
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert weight.grad is not None and weight.grad != 0
    t = seen["t"]
    assert t.shape == (6,) and torch.equal(t, t.round()) and 0 <= t.min() <= t.max() < 1000
    assert seen["context"].shape == (6, 2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_objective_is_ddpm_algorithm_1_through_the_samplers_denoiser(name):
    """Same draws as DDPM's (t ~ U{0..T−1}, then ε), same x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, same target."""
    schedule = VPSchedule("linear")
    seen = {}

    def model_fn(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    x0 = torch.randn(32, 4, 4, 4)
    terms = DiffusionObjective(schedule, name).loss_terms(model_fn, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, schedule.num_timesteps, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a, s = (v.view(-1, 1, 1, 1) for v in (schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]))
    assert torch.equal(seen["t"], t.float())
    assert torch.allclose(seen["x_t"], a * x0 + s * noise, rtol=1e-5, atol=1e-6)
    target = PARAMETERIZATIONS[name].target(x0, noise, a, s)
    assert torch.allclose(terms.loss, target.pow(2).flatten(1).mean(1), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_ideal_model_minimises_the_expected_loss(name, weighting):
    schedule = VPSchedule(**DDPM_SCHEDULE)
    objective = DiffusionObjective(schedule, name, weighting=weighting)
    ideal = ideal_model_fn(schedule, name)
    x0 = sample_data(4000, size=2, generator=torch.Generator().manual_seed(0))

    def loss_of(model_fn):
        g = torch.Generator().manual_seed(1)  # the same t and noise for every model
        return objective(model_fn, x0, generator=g).item()

    best = loss_of(ideal)
    assert best == pytest.approx(loss_of(ideal), rel=1e-6)  # deterministic per generator
    # L(δ) = L0 + 2δ·C + δ²·Q with C ≈ 0 at the ideal: perturb both ways, far enough that δ²·Q beats C's sampling noise
    for perturb in (lambda out: out * 1.2, lambda out: out * 0.8, lambda out: out + 0.2, lambda out: out - 0.2):
        assert best < loss_of(lambda x_t, t: perturb(ideal(x_t, t)))


def test_min_snr_terms_are_the_unweighted_terms_times_the_weight():
    schedule = VPSchedule("linear")
    x0 = torch.randn(16, 4, 4, 4)

    def model_fn(x_t, t):
        return torch.zeros_like(x_t)

    plain = DiffusionObjective(schedule, "v").loss_terms(model_fn, x0, generator=torch.Generator().manual_seed(3))
    weighted = DiffusionObjective(schedule, "v", weighting="min_snr", min_snr_gamma=2.0).loss_terms(
        model_fn, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.sigma, weighted.sigma)
    snr = schedule.snr(plain.sigma)
    assert torch.allclose(weighted.loss, plain.loss * snr.clamp(max=2.0) / (snr + 1), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown weighting"):
        DiffusionObjective(schedule, "v", weighting="p2")


def test_offset_noise_adds_a_per_channel_constant():
    schedule = VPSchedule("linear")
    b, c, hw = 2000, 4, 16
    recorded = {}

    def model_fn(x_t, t):
        recorded.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    def channel_mean_variance(offset):
        x0 = torch.zeros(b, c, 4, 4)  # then x_t = sqrt(1 − ᾱ)·noise
        objective = DiffusionObjective(schedule, "eps", offset_noise=offset)
        objective(model_fn, x0, generator=torch.Generator().manual_seed(0))
        noise = recorded["x_t"] / schedule.sqrt_one_minus_alphas_cumprod[recorded["t"].long()].view(-1, 1, 1, 1)
        return noise.mean(dim=(2, 3)).var().item()  # variance of per-(sample, channel) spatial means

    assert channel_mean_variance(0.0) == pytest.approx(1 / hw, rel=0.1)
    assert channel_mean_variance(0.5) == pytest.approx(1 / hw + 0.25, rel=0.1)


def test_zero_terminal_snr_losses_are_finite():
    schedule = VPSchedule("linear", zero_terminal_snr=True)
    x0 = torch.randn(3000, 1, 2, 2)  # t = 999 is drawn with probability ≈ 95 %
    for name in NAMES:
        model_fn = ideal_model_fn(schedule, name) if name == "v" else (lambda x_t, t: torch.zeros_like(x_t))
        terms = DiffusionObjective(schedule, name, weighting="min_snr").loss_terms(
            model_fn, x0, generator=torch.Generator().manual_seed(0))
        assert (terms.sigma == schedule.sigma_max).any() and torch.isfinite(terms.loss).all(), name
