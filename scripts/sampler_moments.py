"""How far each sampler's samples are from the data, with an exact denoiser on Gaussian data (no network).

    python scripts/sampler_moments.py [--steps 10 20 50] [--n 2000] [--out results/sampler_moments.md]

x0 ~ N(μ_c, s_c²) per channel (ldm.eval.gaussian), whose ideal ε / v / velocity is closed form, so every error
in the table is the sampler's (its ladder and order). One row per schedule × sampler × ladder × steps:
the per-channel std error std/s − 1 and the mean error (mean − μ)/s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from ldm.core.atomic import write_text_atomic
from ldm.core.logging import setup_cli_logging
from ldm.diffusion import Denoiser, FlowSchedule, VPSchedule, sample
from ldm.eval.gaussian import CHANNELS, MEAN, STD, channel_stats, ideal_model_fn

SCHEDULES = {  # name → (schedule, parameterisation)
    "SD (linear 0.00085-0.012), ε": (VPSchedule("linear"), "eps"),
    "DDPM (sqrt_linear 1e-4-0.02), ε": (VPSchedule("sqrt_linear", linear_start=1e-4, linear_end=0.02), "eps"),
    "rectified flow, velocity": (FlowSchedule(), "flow"),
}
CASES = [("dpmpp_2m", "default"), ("dpmpp_2m", "linspace"), ("dpmpp_2m", "karras"), ("euler", "default"),
         ("heun", "default"), ("heun", "karras"), ("ddim", "default")]
SECOND_ORDER_PENULTIMATE = ("dpmpp_2m", "default", {"first_order_penultimate": False})  # diffusers' last steps
SIZE = 8


def measure(steps: Sequence[int], n: int, seed: int = 0) -> list[str]:
    """Markdown rows of the table."""
    noise = torch.randn(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    rows = []
    for label, (schedule, param) in SCHEDULES.items():
        denoiser = Denoiser(ideal_model_fn(schedule, param), schedule, param)
        for name, spacing, *opts in [*CASES, SECOND_ORDER_PENULTIMATE]:
            for k in steps:
                ladder = None if spacing == "default" else spacing
                result = sample(name, denoiser, noise, schedule, k, spacing=ladder, **(opts[0] if opts else {}))
                mean, std = channel_stats(result.x)
                std_err = " / ".join(f"{v:+.1%}" for v in (std / STD - 1).tolist())
                mean_err = " / ".join(f"{v:+.3f}" for v in ((mean - MEAN) / STD).tolist())
                shown = f"{spacing} ({schedule.default_spacing(name)})" if spacing == "default" else spacing
                shown += ", second-order penultimate step (diffusers)" if opts else ""
                rows.append(f"| {label} | {name} | {shown} | {k} | {result.nfe} | {std_err} | {mean_err} |")
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    """Measure and print (and optionally write) the table."""
    setup_cli_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--n", type=int, default=2000, help="samples (each 2×8×8 independent draws)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    header = ["| schedule | sampler | ladder | steps | NFE | std error (per channel) | mean error / s |",
              "|---|---|---|---|---|---|---|"]
    table = "\n".join(header + measure(args.steps, args.n)) + "\n"
    print(table)
    if args.out:
        write_text_atomic(args.out, table)
    return table


if __name__ == "__main__":
    main()
