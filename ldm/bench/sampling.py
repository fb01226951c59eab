"""Sampling speed: our DPM-Solver++(2M) + CFG vs diffusers' DPMSolverMultistepScheduler, same U-Net weights."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ldm.bench.measures import inference
from ldm.bench.report import Row
from ldm.bench.sizes import GUIDANCE_SCALE, LATENT_CHANNELS, SAMPLING_STEPS, BenchSizes
from ldm.bench.steps import NUM_TRAIN_TIMESTEPS, Options, maybe_compile, place_input, unet_pair
from ldm.bench.timing import paired_medians
from ldm.bench.twins import max_relative_error
from ldm.diffusion import NoiseSchedule, cfg_denoiser, make_denoiser, sample
from ldm.diffusion.schedule import SD_LINEAR_END, SD_LINEAR_START

SAMPLER = "dpmpp_2m"


def diffusers_scheduler():
    """diffusers' DPM-Solver++(2M) over SD's betas with the spacing our dpmpp_2m uses (linspace)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=SD_LINEAR_START, beta_end=SD_LINEAR_END,
        beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
        timestep_spacing="linspace",
    )


def diffusers_sample(unet: nn.Module, scheduler, noise: Tensor, cond: Tensor, uncond: Tensor, scale: float,
                     steps: int) -> Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline: batched CFG, ``scheduler.step`` per step."""
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])  # (2B, T, D)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)  # (2B, C, h, w)
        eps_uncond, eps_cond = unet(model_input, t, context).chunk(2)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


def measure_sampling(sizes: BenchSizes, opts: Options, precisions: Sequence[str], notes: list[str]) -> list[Row]:
    """Images/s at SAMPLING_STEPS steps with CFG: ldm.diffusion's dpmpp_2m vs diffusers' scheduler loop."""
    ours, theirs = (m.eval() for m in unet_pair(sizes, opts))
    ours, theirs = maybe_compile(ours, opts), maybe_compile(theirs, opts)
    schedule = NoiseSchedule().to(opts.device)  # SD's betas, as the diffusers scheduler's
    scheduler = diffusers_scheduler()
    g = torch.Generator().manual_seed(4)
    b, h = sizes.batch, sizes.latent_size
    noise = place_input(torch.randn(b, LATENT_CHANNELS, h, h, generator=g), opts)
    cond, uncond = (torch.randn(b, sizes.tokens, sizes.context_dim, generator=g).to(opts.device) for _ in range(2))
    denoiser = cfg_denoiser(make_denoiser(ours, schedule, "eps"), {"context": cond}, {"context": uncond},
                            GUIDANCE_SCALE)
    fns = {
        "ours": lambda: sample(SAMPLER, denoiser, noise, schedule, SAMPLING_STEPS),
        "theirs": lambda: diffusers_sample(theirs, scheduler, noise, cond, uncond, GUIDANCE_SCALE, SAMPLING_STEPS),
    }
    with torch.no_grad():
        result = fns["ours"]()
        error = max_relative_error(result.x, fns["theirs"]())
    notes.append(f"Sampling: {SAMPLING_STEPS} steps, CFG {GUIDANCE_SCALE} (one batched 2B forward per step, "
                 f"{result.nfe} U-Net calls on both sides), {b} images of {h}×{h} latents; fp32 samples of the two "
                 f"stacks from the same noise agree to {error:.1e} (max relative: the σ ladders differ, ours ends "
                 f"at t = 0 as k-diffusion's linspace, diffusers' at t ≈ T/steps).")
    rows = []
    for precision in precisions:
        sec = paired_medians({name: inference(fn, opts, precision) for name, fn in fns.items()},
                             opts.device, opts.warmup, opts.repeats)
        rows.append(Row(f"sampling DPM-Solver++(2M) {SAMPLING_STEPS} steps + CFG, ours vs diffusers",
                        b / sec["ours"], b / sec["theirs"], "images/s", precision))
    return rows
