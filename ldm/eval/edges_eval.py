"""`evaluate.py edges`: controllability of a ControlNet run — edge F1 between each hint and its output's edges.

The balanced held-out shapes items give the prompts and, as control images, their Canny hints (the
dataset's own, white on black); each output's Canny edges (same thresholds) are matched to the hint with a
1-pixel tolerance (``ldm.eval.measures.edge_scores``), as ControlNet++ measures controllability. The
analytic reader's prompt adherence of the same outputs is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import torch
from PIL import Image

from ldm.eval.heldout import held_out
from ldm.eval.measures import edge_scores
from ldm.eval.report import EvalError
from ldm.eval.sampled import (
    add_sampling_arguments,
    check_counts,
    conditions_for,
    generate,
    load_pipeline,
    parse_samplers,
    save_grid,
)
from ldm.eval.shapes_reader import adherence
from ldm.inference.pipeline import Pipeline

DEFAULT_N = 64
DEFAULT_SAMPLER = "ddim:50"
DEFAULT_CONTROL_SCALE = 1.0
GRID_PAIRS = 8
PERCENT = 100.0
MAX_BYTE = 255


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `edges` subcommand's options."""
    add_sampling_arguments(parser, DEFAULT_N, "ControlNet run, e.g. runs/controlnet/latest")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"NAME:STEPS (default {DEFAULT_SAMPLER})")
    parser.add_argument("--control-scale", type=float, default=DEFAULT_CONTROL_SCALE,
                        help=f"strength of the control residuals (default {DEFAULT_CONTROL_SCALE:g})")


def takes_control() -> bool:
    """Whether this version of the pipeline accepts control images (``pipe(..., control=...)``)."""
    if "control_model" in {f.name for f in dataclasses.fields(Pipeline)}:
        return True
    methods = ("__call__", "generate", "iter_generate", "generate_tensors")
    return any("control" in inspect.signature(getattr(Pipeline, m)).parameters for m in methods if hasattr(Pipeline, m))


def hint_image(hint: torch.Tensor) -> Image.Image:
    """(3, H, W) hint in [0, 1] → RGB PIL edge map, as a user passes to ``--control``."""
    return Image.fromarray((hint.clamp(0, 1) * MAX_BYTE).round().byte().permute(1, 2, 0).numpy())


def run(args: argparse.Namespace) -> dict:
    """One row: edge precision / recall / F1 of the outputs against their hints, and reader adherence."""
    check_counts(args)
    (sampler, steps), = parse_samplers(args.sampler)
    if not takes_control():
        raise EvalError("ldm.inference.pipeline cannot take control images yet (no control= argument); edges needs it")
    pipe = load_pipeline(args.run, None, args.device)
    if getattr(pipe, "control_model", True) is None:
        raise EvalError(f"{args.run} has no ControlNet; pass a stage-3 run such as runs/controlnet/latest")
    held = held_out(args.n, int(pipe.image_size), hints=True)
    hints = [hint_image(h) for h in held.hints]
    result = generate(pipe, conditions_for(pipe, held), sampler, steps, args.scale, args.seed, args.batch_size,
                      control=hints, control_scale=args.control_scale)
    scores = edge_scores(result.images, held.hints)
    save_grid(result.images, args.grid, rows=[hints[:GRID_PAIRS], result.images[:GRID_PAIRS]])
    return {"command": "edges", "run": Path(pipe.source["run"]).name, "sampler": sampler, "steps": steps,
            "nfe": result.nfe, "scale": args.scale, "control_scale": args.control_scale, "n": len(hints),
            "edge_precision": scores["edge_precision"], "edge_recall": scores["edge_recall"],
            "edge_f1": scores["edge_f1"], "reader_adherence_pct": PERCENT * adherence(result.images, held.factors)["all"]}


def summary(row: dict) -> list[tuple[str, str, object]]:
    """(setting, measure, value) triples for the gathered table of `evaluate.py all`."""
    setting = f"{row['sampler']} {row['steps']} steps, scale {row['scale']:g}, control {row['control_scale']:g}, n={row['n']}"
    return [(setting, "edge F1", row["edge_f1"]), (setting, "edge precision / recall",
            f"{row['edge_precision']:.3f} / {row['edge_recall']:.3f}"),
            (setting, "reader adherence %", row["reader_adherence_pct"])]
