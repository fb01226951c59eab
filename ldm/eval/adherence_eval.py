"""`evaluate.py adherence`: prompt adherence of a text run per sampler and NFE, and its images/s.

Held-out prompts of the shapes vocabulary (``ldm.eval.heldout``) are drawn with each sampler / step count
from the same seeds and read back analytically (``ldm.eval.shapes_reader``): adherence = all of shape
kind, fill and background right; the per-factor shares follow. A last row times DPM-Solver++(2M) at
20 steps on one batch of 8 after a warm-up, the sampling speed the README table reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.eval.heldout import held_out
from ldm.eval.sampled import (
    add_sampling_arguments,
    check_counts,
    generate,
    load_pipeline,
    parse_samplers,
    require_shapes,
    save_grid,
)
from ldm.eval.shapes_reader import adherence

DEFAULT_N = 64
DEFAULT_SAMPLERS = "ddim:50,ddpm:1000,dpmpp_2m:20,ddim:100"
SPEED_SAMPLER, SPEED_STEPS, SPEED_BATCH = "dpmpp_2m", 20, 8
NOT_MEASURED = "—"
PERCENT = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `adherence` subcommand's options."""
    add_sampling_arguments(parser, DEFAULT_N, "text-conditional stage-2 run, e.g. runs/ldm/latest")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"NAME:STEPS list (default {DEFAULT_SAMPLERS})")
    parser.add_argument("--no-speed", dest="speed", action="store_false",
                        help=f"skip the images/s row ({SPEED_SAMPLER}, {SPEED_STEPS} steps, batch {SPEED_BATCH})")


def _row(run: str, sampler: str, steps: int, nfe: int, scale: float, n: object, scores: dict | None,
         images_per_s: float) -> dict:
    pct = (lambda k: PERCENT * scores[k]) if scores else (lambda k: NOT_MEASURED)
    return {"command": "adherence", "run": run, "sampler": sampler, "steps": steps, "nfe": nfe, "scale": scale,
            "n": n, "adherence_pct": pct("all"), "shape_pct": pct("shape"), "color_pct": pct("color"),
            "background_pct": pct("background"), "images_per_s": images_per_s}


def run(args: argparse.Namespace) -> list[dict]:
    """Adherence rows, one per sampler, plus the speed row."""
    check_counts(args)
    samplers = parse_samplers(args.samplers)
    pipe = load_pipeline(args.run, "caption", args.device)
    require_shapes(pipe, "adherence")
    run_name = Path(pipe.source["run"]).name
    held = held_out(args.n)
    rows, first = [], None
    for sampler, steps in samplers:
        result = generate(pipe, held.captions, sampler, steps, args.scale, args.seed, args.batch_size)
        first = first or result.images
        scores = adherence(result.images, held.factors)
        rows.append(_row(run_name, sampler, steps, result.nfe, args.scale, len(held.captions), scores,
                         result.images_per_s))
    if args.speed:
        prompts = (held.captions * SPEED_BATCH)[:SPEED_BATCH]
        generate(pipe, prompts[:1], SPEED_SAMPLER, 1, args.scale, args.seed, SPEED_BATCH)  # warm-up
        timed = generate(pipe, prompts, SPEED_SAMPLER, SPEED_STEPS, args.scale, args.seed, SPEED_BATCH)
        rows.append(_row(run_name, SPEED_SAMPLER, SPEED_STEPS, timed.nfe, args.scale, f"{SPEED_BATCH} (speed)",
                         None, timed.images_per_s))
    save_grid(first, args.grid)
    return rows


def summary(row: dict) -> list[tuple[str, str, object]]:
    """(setting, measure, value) triples of one row, for the gathered table of `evaluate.py all`."""
    setting = f"{row['sampler']} {row['steps']} steps (NFE {row['nfe']}), scale {row['scale']:g}, n={row['n']}"
    if row["adherence_pct"] == NOT_MEASURED:
        return [(setting, "images/s", row["images_per_s"])]
    return [(setting, "adherence %", row["adherence_pct"]), (setting, "shape / colour / background %",
            f"{row['shape_pct']:.1f} / {row['color_pct']:.1f} / {row['background_pct']:.1f}"),
            (setting, "images/s", row["images_per_s"])]
