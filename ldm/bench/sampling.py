"""Sampling speed: our DPM-Solver++(2M) + CFG vs diffusers' DPMSolverMultistepScheduler, same U-Net weights,
eager and compiled."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ldm.bench.measures import inference
from ldm.bench.report import Row
from ldm.bench.sizes import GUIDANCE_SCALE, LATENT_CHANNELS, SAMPLING_STEPS, BenchSizes
from ldm.bench.steps import NUM_TRAIN_TIMESTEPS, Options, place_input, unet_pair
from ldm.bench.timing import paired_medians
from ldm.bench.twins import max_relative_error
from ldm.diffusion import Denoiser, VPSchedule, sample_latents
from ldm.diffusion.schedule import SD_LINEAR_END, SD_LINEAR_START
from ldm.nets.compile import compile_network

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
    """Images/s at SAMPLING_STEPS steps with CFG: ldm.diffusion's dpmpp_2m vs diffusers' scheduler loop.

    Three rows per precision: both eager; ours compiled as ``Pipeline.compile()`` does (frozen weights) vs
    diffusers eager, as each library runs out of the box; both compiled the same way.
    """
    ours, theirs = (m.eval() for m in unet_pair(sizes, opts))
    compiled = {name: compile_network(copy.deepcopy(m), opts.device, inference=True, backend=opts.backend)
                for name, m in (("ours", ours), ("theirs", theirs))}
    schedule = VPSchedule().to(opts.device)  # SD's betas, as the diffusers scheduler's
    scheduler = diffusers_scheduler()
    g = torch.Generator().manual_seed(4)
    b, h = sizes.batch, sizes.latent_size
    noise = place_input(torch.randn(b, LATENT_CHANNELS, h, h, generator=g), opts)
    cond, uncond = (torch.randn(b, sizes.tokens, sizes.context_dim, generator=g).to(opts.device) for _ in range(2))

    def ours_loop(model: nn.Module) -> Callable[[], Tensor]:
        denoiser = Denoiser(model, schedule, "eps")
        return lambda: sample_latents(denoiser, noise, {"context": cond}, {"context": uncond}, sampler=SAMPLER,
                                      steps=SAMPLING_STEPS, guidance=GUIDANCE_SCALE).x

    def theirs_loop(model: nn.Module) -> Callable[[], Tensor]:
        return lambda: diffusers_sample(model, scheduler, noise, cond, uncond, GUIDANCE_SCALE, SAMPLING_STEPS)

    fns = {"ours": ours_loop(ours), "theirs": theirs_loop(theirs),
           "ours compiled": ours_loop(compiled["ours"]), "theirs compiled": theirs_loop(compiled["theirs"])}
    first_call, agreement = {}, {}
    with torch.no_grad():
        eager = {name: fns[name]() for name in ("ours", "theirs")}
        for name, reference in eager.items():
            start = time.perf_counter()
            out = fns[f"{name} compiled"]()  # the first call compiles (fp32 here)
            first_call[name] = time.perf_counter() - start
            agreement[name] = max_relative_error(reference, out)
    error = max_relative_error(eager["ours"], eager["theirs"])
    notes.append(f"Sampling: {SAMPLING_STEPS} steps, CFG {GUIDANCE_SCALE} (one batched 2B forward per step, "
                 f"{SAMPLING_STEPS} U-Net calls on both sides), {b} images of {h}×{h} latents; fp32 samples of the two "
                 f"stacks from the same noise agree to {error:.1e} (max relative: the σ ladders differ, ours ends "
                 f"at t = 0 as k-diffusion's linspace, diffusers' at t ≈ T/steps).")
    notes.append(f"Compiled sampling: both U-Nets by ldm.nets.compile.compile_network(inference=True) (backend "
                 f"{opts.backend}; TorchInductor freezes the weights), as Pipeline.compile() / txt2img.py --compile; "
                 f"the first fp32 sampling call (compiling included) took {first_call['ours']:.0f} s (ours) and "
                 f"{first_call['theirs']:.0f} s (diffusers); compiled samples agree with eager ones to {agreement['ours']:.1e} / "
                 f"{agreement['theirs']:.1e} (max relative).")
    rows = []
    for precision in precisions:
        runs = {name: inference(fn, opts, precision) for name, fn in fns.items()}
        for name in ("ours compiled", "theirs compiled"):
            runs[name]()  # a precision's first call compiles again (autocast is part of the graph): not timed
        sec = paired_medians(runs, opts.device, opts.warmup, opts.repeats)
        prefix = f"sampling DPM-Solver++(2M) {SAMPLING_STEPS} steps + CFG"
        rows += [Row(f"{prefix}, ours vs diffusers", b / sec["ours"], b / sec["theirs"], "images/s", precision),
                 Row(f"{prefix}, ours compiled vs diffusers eager", b / sec["ours compiled"], b / sec["theirs"],
                     "images/s", precision),
                 Row(f"{prefix}, both compiled, ours vs diffusers", b / sec["ours compiled"],
                     b / sec["theirs compiled"], "images/s", precision)]
    return rows
