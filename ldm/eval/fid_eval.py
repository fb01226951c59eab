"""`evaluate.py fid`: Fréchet distance, in the shapes classifier's feature space, of a run's samples vs real ones.

Any stage-2 run (text or class): the balanced held-out items are drawn from their captions or labels and
compared with real renders of the same items. The same distance between two independent real sets of the same
size is printed beside it: the floor that the sample count alone gives (FID is biased upwards at small n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.eval.class_eval import add_classifier_arguments, classifier_for
from ldm.eval.heldout import held_out
from ldm.eval.measures import fid
from ldm.eval.report import EvalError
from ldm.eval.sampled import (
    add_sampling_arguments,
    check_counts,
    conditions_for,
    generate,
    load_pipeline,
    parse_samplers,
    require_shapes,
    save_grid,
)

DEFAULT_N = 256
FLOOR_SEED = 1  # a second, independent draw of real held-out items (same classes, new geometry)
MIN_N = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fid` subcommand's options."""
    add_sampling_arguments(parser, DEFAULT_N, "stage-2 run (text or class), e.g. runs/ldm/latest")
    add_classifier_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    """One row: feature FID of generated vs held-out real images, and the real-vs-real floor."""
    check_counts(args)
    if args.n < MIN_N:
        raise EvalError(f"--n must be at least {MIN_N} for a covariance, got {args.n}")
    (sampler, steps), = parse_samplers(args.sampler)
    pipe = load_pipeline(args.run, None, args.device)
    require_shapes(pipe, "fid")
    size = int(pipe.image_size)
    held = held_out(args.n, size)
    result = generate(pipe, conditions_for(pipe, held), sampler, steps, args.scale, args.seed, args.batch_size)
    classifier = classifier_for(args, size)
    floor = fid(held_out(args.n, size, seed=FLOOR_SEED).images, held.images, classifier)
    save_grid(result.images, args.grid)
    return {"command": "fid", "run": Path(pipe.source["run"]).name, "sampler": sampler, "steps": steps,
            "nfe": result.nfe, "scale": args.scale, "n": len(held.images),
            "fid": fid(result.images, held.images, classifier), "fid_real_vs_real": floor}


def summary(row: dict) -> list[tuple[str, str, object]]:
    """(setting, measure, value) triples for the gathered table of `evaluate.py all`."""
    setting = f"{row['sampler']} {row['steps']} steps, scale {row['scale']:g}, n={row['n']}"
    return [(setting, "feature FID", row["fid"]), (setting, "feature FID, real vs real (floor)", row["fid_real_vs_real"])]
