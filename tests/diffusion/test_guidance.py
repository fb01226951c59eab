"""Classifier-free guidance: one batched call, scale 1 skips the unconditional pass, rescale, key-set contract."""

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.sampling import sample
from ldm.diffusion.schedule import VPSchedule
from tests.gaussian_data import FunctionDenoiser, ideal_model_fn, ideal_x0

B, TOKENS, DIM = 3, 5, 8
SCHEDULE = VPSchedule()


class RecordingDenoiser:
    """A conditional toy denoiser: the ideal Gaussian x0 shifted by the context (and hint) means; logs calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, control=None, strength=1.0):
        self.calls.append({"batch": x.shape[0], "sigma": sigma, "context": context, "control": control})
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        if control is not None:
            shift = shift + strength * control.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return ideal_x0(x, sigma) + shift * (1 + x.tanh())


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 4, 4, generator=g) * 2
    sigma = torch.tensor([0.5, 1.0, 3.0])
    cond = {"context": torch.randn(B, TOKENS, DIM, generator=g)}
    uncond = {"context": torch.randn(B, TOKENS, DIM, generator=g)}
    return x, sigma, cond, uncond


def test_scale_one_is_the_conditional_output_in_one_call_of_batch_b():
    den = RecordingDenoiser()
    x, sigma, cond, uncond = _inputs()
    out = cfg_denoiser(den, cond, uncond, scale=1.0)(x, sigma)
    assert [c["batch"] for c in den.calls] == [B]
    assert torch.equal(out, RecordingDenoiser()(x, sigma, **cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_is_one_call_of_batch_2b(scale):
    den, ref = RecordingDenoiser(), RecordingDenoiser()
    x, sigma, cond, uncond = _inputs()
    out = cfg_denoiser(den, cond, uncond, scale=scale)(x, sigma)
    assert [c["batch"] for c in den.calls] == [2 * B]
    assert torch.equal(den.calls[0]["context"], torch.cat([uncond["context"], cond["context"]]))  # [uncond; cond]
    assert torch.equal(den.calls[0]["sigma"], torch.cat([sigma, sigma]))
    c, u = ref(x, sigma, **cond), ref(x, sigma, **uncond)
    assert torch.allclose(out, u + scale * (c - u), atol=1e-5)


def test_batch_one_conditioning_is_broadcast_and_scalar_sigma_accepted():
    den = RecordingDenoiser()
    x, _, cond, uncond = _inputs()
    one = {"context": cond["context"][:1]}
    null = {"context": torch.zeros(1, TOKENS, DIM)}
    out = cfg_denoiser(den, one, null, scale=4.0)(x, torch.tensor(2.0))
    assert den.calls[0]["batch"] == 2 * B and den.calls[0]["context"].shape == (2 * B, TOKENS, DIM)
    full = cfg_denoiser(RecordingDenoiser(), {"context": one["context"].expand(B, -1, -1)},
                        {"context": null["context"].expand(B, -1, -1)}, scale=4.0)(x, torch.full((B,), 2.0))
    assert torch.allclose(out, full)


def test_rescale_zero_is_plain_cfg_and_rescale_matches_lin_et_al_in_eps_space():
    x, sigma, cond, uncond = _inputs(1)
    plain = cfg_denoiser(RecordingDenoiser(), cond, uncond, scale=7.0)(x, sigma)
    assert torch.equal(cfg_denoiser(RecordingDenoiser(), cond, uncond, scale=7.0, rescale=0.0)(x, sigma), plain)

    # Reference: diffusers' rescale_noise_cfg on ε = (x − x0)/σ, written out independently.
    ref = RecordingDenoiser()
    s = sigma.view(-1, 1, 1, 1)
    eps_c, eps_u = (x - ref(x, sigma, **cond)) / s, (x - ref(x, sigma, **uncond)) / s
    eps_cfg = eps_u + 7.0 * (eps_c - eps_u)
    std_c, std_cfg = eps_c.std(dim=(1, 2, 3), keepdim=True), eps_cfg.std(dim=(1, 2, 3), keepdim=True)
    for phi in (0.7, 1.0):
        eps = phi * eps_cfg * std_c / std_cfg + (1 - phi) * eps_cfg
        den = FunctionDenoiser(RecordingDenoiser(), SCHEDULE, "eps")
        out = cfg_denoiser(den, cond, uncond, scale=7.0, rescale=phi)(x, sigma)
        assert torch.allclose(out, x - s * eps, atol=1e-4)
        assert not torch.allclose(out, plain, atol=1e-3)


def test_rescale_in_v_space_matches_the_std_of_the_conditional_v():
    x, sigma, cond, uncond = _inputs(2)
    out = cfg_denoiser(FunctionDenoiser(RecordingDenoiser(), SCHEDULE, "v"), cond, uncond, scale=5.0, rescale=1.0)(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    alpha, sigma_vp = (1 + s**2).rsqrt(), s * (1 + s**2).rsqrt()  # VP coefficients of VE σ, written out

    def v_of(x0):  # v = α·ε − σ_vp·x0 with ε = (x − x0)/σ
        return alpha * (x - x0) / s - sigma_vp * x0

    v_cond = v_of(RecordingDenoiser()(x, sigma, **cond))
    assert torch.allclose(v_of(out).std(dim=(1, 2, 3)), v_cond.std(dim=(1, 2, 3)), rtol=1e-4)
    with pytest.raises(TypeError, match="pass a Denoiser"):
        cfg_denoiser(RecordingDenoiser(), cond, uncond, scale=5.0, rescale=1.0)


def test_guess_mode_control_only_in_the_conditional_branch_runs_two_calls():
    den, ref = RecordingDenoiser(), RecordingDenoiser()
    x, sigma, cond, uncond = _inputs(3)
    hint = torch.rand(B, 3, 16, 16)
    out = cfg_denoiser(den, {**cond, "control": hint}, uncond, scale=2.0)(x, sigma)
    assert [c["batch"] for c in den.calls] == [B, B]
    assert den.calls[0]["control"] is None and den.calls[1]["control"] is hint  # uncond first, without control
    c, u = ref(x, sigma, control=hint, **cond), ref(x, sigma, **uncond)
    assert torch.allclose(out, u + 2.0 * (c - u), atol=1e-5)


def test_shared_control_and_non_tensor_values_batch_in_one_call():
    den = RecordingDenoiser()
    x, sigma, cond, uncond = _inputs(4)
    hint = torch.rand(B, 3, 16, 16)
    cfg_denoiser(den, {**cond, "control": hint, "strength": 0.5}, {**uncond, "control": hint, "strength": 0.5},
                 scale=3.0)(x, sigma)
    assert [c["batch"] for c in den.calls] == [2 * B] and den.calls[0]["control"].shape == (2 * B, 3, 16, 16)
    with pytest.raises(ValueError, match="strength"):
        cfg_denoiser(den, {**cond, "strength": 0.5}, {**uncond, "strength": 1.0}, scale=3.0)(x, sigma)


def test_list_values_are_batched_element_wise():
    seen = []

    def den(x, sigma, context, residuals):
        seen.append([r.shape[0] for r in residuals])
        return x * 0 + sum(r.mean() for r in residuals)

    x, sigma, cond, uncond = _inputs(5)
    res = [torch.ones(B, 4), torch.ones(B, 2, 2)]
    cfg_denoiser(den, {**cond, "residuals": res}, {**uncond, "residuals": [r * 0 for r in res]}, scale=2.0)(x, sigma)
    assert seen == [[2 * B, 2 * B]]


def test_guided_sampling_through_make_denoiser_counts_one_evaluation_per_step():
    schedule = VPSchedule("sqrt_linear", linear_start=1e-4, linear_end=0.02)
    ideal = ideal_model_fn(schedule, "v")
    batches = []

    def model_fn(x_t, t, context):
        batches.append(x_t.shape[0])
        return ideal(x_t, t) + 0.01 * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    denoiser = Denoiser(model_fn, schedule, "v")
    noise = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, null = {"context": torch.ones(1, TOKENS, DIM)}, {"context": torch.zeros(1, TOKENS, DIM)}
    result = sample("dpmpp_2m", cfg_denoiser(denoiser, cond, null, scale=5.0), noise, schedule, 10)
    assert result.nfe == 10 and batches == [2 * B] * 10 and torch.isfinite(result.x).all()
