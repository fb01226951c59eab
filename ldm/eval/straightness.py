"""`evaluate.py straightness`: how straight a rectified-flow model's sampling paths are (Liu et al. 2022, eq. 9).

S = E_t E ‖(x1 − x0) − v(x_t, t)‖² along the model's own ODE trajectories: x1 the noise, x0 where Euler with
``--steps`` steps ends, v the velocity the (guided) model gives at each step. S = 0 for perfectly straight paths,
on which one Euler step is exact; reflow lowers it. Reported per latent dimension, for held-out prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.diffusion.flow import FlowSchedule
from ldm.eval.heldout import held_out
from ldm.eval.report import EvalError
from ldm.eval.sampled import add_sampling_arguments, check_counts, conditions_for, load_pipeline
from ldm.inference.pipeline import Pipeline

DEFAULT_N = 64
DEFAULT_STEPS = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `straightness` subcommand's options."""
    add_sampling_arguments(parser, DEFAULT_N, "rectified-flow stage-2 run (or a reflow run)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Euler steps along each path (default {DEFAULT_STEPS})")


@torch.no_grad()
def straightness(pipe: Pipeline, conditions: list, steps: int, guidance: float, seed: int, batch_size: int) -> float:
    """S per latent dimension, averaged over the paths of ``conditions`` (image i from seed + i) and their steps."""
    if not isinstance(pipe.schedule, FlowSchedule):
        raise EvalError(f"straightness measures rectified-flow paths; this run's schedule is {type(pipe.schedule).__name__}")
    total, terms = 0.0, 0
    shape = pipe.latent_shape(pipe.image_size, pipe.image_size)
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start:start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + j))
                             for j in range(len(chunk))])  # (B, C, h, w): x1
        steps_seen: list[dict] = []
        x0 = pipe.latents_for(chunk, noise, steps, guidance, "euler", seed=seed + start,
                              callback=steps_seen.append).cpu()
        for info in steps_seen:
            sigma = info["sigma"].cpu()
            t = FlowSchedule.t_of(sigma)
            x_t = info["x"].cpu() / (1 + sigma)  # the flow state α·x
            velocity = (x_t - info["denoised"].cpu()) / t  # dx_t/dt = (x_t − x̂0)/t
            total += ((noise - x0) - velocity).pow(2).mean().item() * len(chunk)
            terms += len(chunk)
    return total / terms


def run(args: argparse.Namespace) -> dict:
    """One row: S of the run's paths."""
    check_counts(args)
    pipe = load_pipeline(args.run, None, args.device)
    held = held_out(args.n)
    value = straightness(pipe, conditions_for(pipe, held), args.steps, args.scale, args.seed, args.batch_size)
    return {"command": "straightness", "run": Path(pipe.source["run"]).name, "steps": args.steps,
            "scale": args.scale, "n": args.n, "straightness": value}


def summary(row: dict) -> list[tuple[str, str, object]]:
    """(setting, measure, value) triples for the gathered table of `evaluate.py all`."""
    return [(f"Euler {row['steps']} steps, scale {row['scale']:g}, n={row['n']}", "straightness S", row["straightness"])]
