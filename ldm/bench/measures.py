"""The benchmark's measurements of training: U-Net step vs diffusers, FLOP/s, memory, VAE, stage-2 caching.

Each function builds its models, appends notes (parameter counts, agreement checks) to ``notes`` and
returns table rows; ``ours``/``theirs`` are named in each row's measurement (diffusers, or a variant).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ldm.bench.report import Row
from ldm.bench.sizes import LATENT_CHANNELS, SD_SCALE_FACTOR, BenchSizes
from ldm.bench.steps import (
    LEARNING_RATE,
    Options,
    autocast,
    fill_zero_init,
    maybe_compile,
    place,
    place_input,
    quiet_lightning,
    train_step,
    unet_inputs,
    unet_pair,
)
from ldm.bench.timing import (
    count_flops,
    matmul_peak_flops,
    paired_medians,
    peak_memory_bytes,
)
from ldm.bench.twins import count_parameters, diffusers_vae_like, max_relative_error
from ldm.core.dtypes import resolve_dtype
from ldm.diffusion import DiffusionObjective, VPSchedule
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.nets.compile import compile_network
from ldm.nets.conditioning.embedders import ClassEmbedder
from ldm.nets.unet.model import UNetModel
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.systems.optim import fused_supported

GIGA = 1e9
MEBI = 2**20
PROFILE_ROWS = 25
MEMORY_ROW = "U-Net train step peak memory beyond weights, grads, AdamW state"


def write_profiles(fns: dict[str, Callable[[], object]], opts: Options, prefix: Path) -> None:
    """One profiled call of each function; its op tables (by self time; per op, then per op and input shapes)
    written to ``<prefix>-<name>.txt``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if opts.device.type == "cuda" else "self_cpu_time_total"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in fns.items():
        with profile(activities=activities, record_shapes=True) as prof:
            fn()
        tables = [prof.key_averages(group_by_input_shape=by_shape).table(sort_by=sort_by, row_limit=PROFILE_ROWS)
                  for by_shape in (False, True)]
        Path(f"{prefix}-{name}.txt").write_text("\n\n".join(tables))


def inference(fn: Callable[[], object], opts: Options, precision: str) -> Callable[[], None]:
    """``fn`` run without gradients under the precision's autocast."""

    def run() -> None:
        with torch.no_grad(), autocast(opts.device, precision):
            fn()

    return run


def activation_memory(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], opts: Options,
                      precision: str) -> dict[str, float]:
    """MiB a training step allocates at its peak beyond weights, gradients and AdamW state (made by a first step)."""
    memory = {}
    for name, model in models.items():
        step = train_step(model, inputs, opts, precision, keep_grads=True)
        step()  # allocates the gradients and the optimiser state
        memory[name] = peak_memory_bytes(step, opts.device) / MEBI
    return memory


def measure_unet(sizes: BenchSizes, opts: Options, precisions: Sequence[str], notes: list[str],
                 profile_dir: Path | None = None) -> list[Row]:
    """U-Net training step, ours vs diffusers: steps/s, achieved FLOP/s vs the matmul peak, peak memory."""
    ours, theirs = unet_pair(sizes, opts)
    inputs = unet_inputs(sizes, opts)
    x, t, ctx = inputs["x"], inputs["t"], inputs["context"]
    with torch.no_grad():
        error = max_relative_error(ours(x, t, ctx), theirs(x, t, ctx))
    flops = {"ours": count_flops(train_step(ours, inputs, opts, "fp32")),
             "theirs": count_flops(train_step(theirs, inputs, opts, "fp32"))}
    notes.append(f"U-Net: {count_parameters(ours):,} parameters on both sides (checked equal); outputs agree to "
                 f"{error:.1e} (max relative); {flops['ours'] / GIGA:.3g} GFLOP per training step "
                 f"(diffusers: {flops['theirs'] / GIGA:.3g}), counted by torch.utils.flop_counter. Each side steps AdamW as "
                 "its project trains: ours fused (ldm.systems.optim), diffusers' scripts torch's default.")
    models = {"ours": maybe_compile(ours, opts), "theirs": maybe_compile(theirs, opts)}
    rows = []
    for precision in precisions:
        steps = {name: train_step(model, inputs, opts, precision, fused=name == "ours") for name, model in models.items()}
        sec = paired_medians(steps, opts.device, opts.warmup, opts.repeats)
        rows.append(Row("U-Net train step (fwd+bwd+AdamW), ours vs diffusers", 1 / sec["ours"], 1 / sec["theirs"],
                        "steps/s", precision))
        peak = matmul_peak_flops(opts.device, resolve_dtype(precision), sizes.matmul_size, opts.warmup, opts.repeats) / GIGA
        for name, who in (("ours", "ours"), ("theirs", "diffusers")):
            rows.append(Row(f"U-Net step achieved FLOP/s ({who}) vs {opts.device.type} {sizes.matmul_size}² matmul",
                            flops[name] / sec[name] / GIGA, peak, "GFLOP/s", precision))
        memory = activation_memory(models, inputs, opts, precision)
        rows.append(Row(f"{MEMORY_ROW}, ours vs diffusers", memory["ours"], memory["theirs"], "MiB", precision))
        if profile_dir is not None:
            write_profiles(steps, opts, profile_dir / f"unet-step-{precision}")
    return rows


def measure_checkpointing(sizes: BenchSizes, opts: Options, precisions: Sequence[str]) -> list[Row]:
    """Our U-Net training step with gradient checkpointing (use_checkpoint) vs without: peak memory and speed."""
    plain, _ = unet_pair(sizes, opts)
    ckpt = place(UNetModel(**{**sizes.unet, "use_checkpoint": True}), opts)
    ckpt.load_state_dict(plain.state_dict())
    inputs = unet_inputs(sizes, opts)
    rows = []
    for precision in precisions:
        steps = {"ours": train_step(maybe_compile(ckpt, opts), inputs, opts, precision),
                 "theirs": train_step(maybe_compile(plain, opts), inputs, opts, precision)}
        sec = paired_medians(steps, opts.device, opts.warmup, opts.repeats)
        memory = activation_memory({"ours": ckpt, "theirs": plain}, inputs, opts, precision)
        rows.append(Row(f"{MEMORY_ROW}, checkpointing vs none", memory["ours"], memory["theirs"], "MiB", precision))
        rows.append(Row("U-Net train step, checkpointing vs none", 1 / sec["ours"], 1 / sec["theirs"], "steps/s",
                        precision))
    return rows


def measure_compiled_step(sizes: BenchSizes, opts: Options, precisions: Sequence[str]) -> list[Row]:
    """Our U-Net training step compiled as ``compile: true`` does (ldm.nets.compile) vs eager, same weights."""
    eager, _ = unet_pair(sizes, opts)
    compiled = compile_network(copy.deepcopy(eager), opts.device, backend=opts.backend)
    inputs = unet_inputs(sizes, opts)
    rows = []
    for precision in precisions:
        steps = {"ours": train_step(compiled, inputs, opts, precision, fused=True),
                 "theirs": train_step(eager, inputs, opts, precision, fused=True)}
        steps["ours"]()  # the first call (of each precision: autocast is part of the graph) compiles: not timed
        sec = paired_medians(steps, opts.device, opts.warmup, opts.repeats)
        rows.append(Row("U-Net train step, compiled vs eager (ours)", 1 / sec["ours"], 1 / sec["theirs"], "steps/s",
                        precision))
    return rows


def measure_channels_last(sizes: BenchSizes, opts: Options, precisions: Sequence[str]) -> list[Row]:
    """Our U-Net training step with channels-last weights and inputs vs the default contiguous (NCHW) layout."""
    layouts = {"ours": replace(opts, channels_last=True), "theirs": replace(opts, channels_last=False)}
    rows = []
    for precision in precisions:
        steps = {}
        for name, layout in layouts.items():
            model, _ = unet_pair(sizes, layout)
            steps[name] = train_step(maybe_compile(model, layout), unet_inputs(sizes, layout), layout, precision)
        sec = paired_medians(steps, opts.device, opts.warmup, opts.repeats)
        rows.append(Row("U-Net train step, channels-last vs contiguous", 1 / sec["ours"], 1 / sec["theirs"], "steps/s",
                        precision))
    return rows


def measure_optimizer(sizes: BenchSizes, opts: Options) -> list[Row]:
    """AdamW's update of the U-Net's parameters: fused kernel vs torch's default (per-tensor loop on CPU)."""
    ours, _ = unet_pair(sizes, opts)
    params = list(ours.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {"ours": torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True),
                  "theirs": torch.optim.AdamW(params, lr=LEARNING_RATE)}
    sec = paired_medians({name: opt.step for name, opt in optimizers.items()}, opts.device, opts.warmup, opts.repeats)
    return [Row("AdamW update of the U-Net, fused vs default", 1 / sec["ours"], 1 / sec["theirs"], "steps/s", "fp32")]


def measure_vae(sizes: BenchSizes, opts: Options, precisions: Sequence[str], notes: list[str]) -> list[Row]:
    """VAE encode (posterior mode) and decode, ours vs diffusers' AutoencoderKL, in images/s (inference)."""
    torch.manual_seed(0)
    ours = fill_zero_init(AutoencoderKL(sizes.vae, embed_dim=LATENT_CHANNELS, channels_last=True)).eval()
    theirs = place(diffusers_vae_like(ours, sizes.vae, LATENT_CHANNELS).eval(), opts)
    ours = place(ours, opts)
    g = torch.Generator().manual_seed(2)
    b, s, f = sizes.batch, sizes.image_size, ours.downsampling_factor
    images = place_input(torch.randn(b, 3, s, s, generator=g).clamp(-1, 1), opts)
    latents = place_input(torch.randn(b, LATENT_CHANNELS, s // f, s // f, generator=g), opts)
    fns = {
        "encode": {"ours": lambda: ours.encode(images).mode(), "theirs": lambda: theirs.encode(images).latent_dist.mode()},
        "decode": {"ours": lambda: ours.decode(latents), "theirs": lambda: theirs.decode(latents).sample},
    }
    with torch.no_grad():
        errors = [max_relative_error(pair["ours"](), pair["theirs"]()) for pair in fns.values()]
    n_params = count_parameters(ours.encoder) + count_parameters(ours.decoder)
    notes.append(f"VAE (f = {f}, {s} px): ~{n_params:,} parameters in encoder + decoder on both sides (checked equal); "
                 f"encode / decode agree to {errors[0]:.1e} / {errors[1]:.1e} (max relative). Ours runs channels-last "
                 "activations (`channels_last: true`, as configs/sd/* set it; also the on-the-fly encoder of stage 2).")
    rows = []
    for precision in precisions:
        for what, pair in fns.items():
            timed = {name: inference(maybe_compile(fn, opts), opts, precision) for name, fn in pair.items()}
            sec = paired_medians(timed, opts.device, opts.warmup, opts.repeats)
            rows.append(Row(f"VAE {what} (inference), ours vs diffusers", b / sec["ours"], b / sec["theirs"],
                            "images/s", precision))
    return rows


def measure_stage2(sizes: BenchSizes, opts: Options, precisions: Sequence[str], notes: list[str]) -> list[Row]:
    """LatentDiffusion.training_step + backward + AdamW on cached posteriors vs encoding images on the fly."""
    torch.manual_seed(0)
    system = LatentDiffusion(
        unet=UNetModel(**sizes.unet), cond_stage=ClassEmbedder(sizes.num_classes, sizes.context_dim),
        objective=DiffusionObjective(VPSchedule()), ema=None,
        first_stage=AutoencoderKL(sizes.vae, embed_dim=LATENT_CHANNELS, channels_last=True),
        scale_factor=SD_SCALE_FACTOR,
    )
    system = place(system, opts)
    system.model.diffusion_model = maybe_compile(system.model.diffusion_model, opts)
    system.first_stage_model.encoder = maybe_compile(system.first_stage_model.encoder, opts)
    f = system.first_stage_model.downsampling_factor
    g = torch.Generator().manual_seed(3)
    b, h = sizes.batch, sizes.latent_size
    labels = torch.randint(0, sizes.num_classes, (b,), generator=g).to(opts.device)
    batches = {
        "ours": {"mean": place_input(torch.randn(b, LATENT_CHANNELS, h, h, generator=g), opts),
                 "std": place_input(torch.rand(b, LATENT_CHANNELS, h, h, generator=g), opts), "label": labels},
        "theirs": {"image": place_input(torch.randn(b, 3, h * f, h * f, generator=g).clamp(-1, 1), opts),
                   "label": labels},
    }
    params = list(system.model.parameters()) + list(system.cond_stage_model.parameters())
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=fused_supported(params))
    notes.append(f"Stage 2 at f = {f}: {h}×{h} latents from {h * f}-px images; the step is LatentDiffusion.training_step "
                 "+ backward + AdamW (no data loading, no EMA); on the fly adds the VAE encoder's forward pass.")
    def step(batch: dict, precision: str) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(opts.device, precision), quiet_lightning():
            loss = system.training_step(batch, 0)
        loss.backward()
        opt.step()

    rows = []
    for precision in precisions:
        fns = {name: (lambda batch=batch, precision=precision: step(batch, precision)) for name, batch in batches.items()}
        sec = paired_medians(fns, opts.device, opts.warmup, opts.repeats)
        rows.append(Row(f"stage-2 train step, cached latents vs on-the-fly VAE encoding (f = {f})",
                        1 / sec["ours"], 1 / sec["theirs"], "steps/s", precision))
    return rows
