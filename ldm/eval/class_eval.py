"""`evaluate.py classes`: class accuracy of a class-conditional run and its feature FID.

On a run trained on a folder of class sub-folders, the reader is a classifier trained on the run's own images
(``ldm.eval.folder_classes``); on the shapes data, as follows.

Balanced held-out classes (``ldm.eval.heldout``) are drawn once; the shapes classifier trained on the
data's own labels (``ldm.eval.classifier``) reads each image's class; the Fréchet distance in its feature
space compares the images with real renders of the same held-out items. The analytic reader's adherence is
reported beside them as an independent check of the classifier.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.eval.classifier import DEFAULT_CACHE_DIR, ShapesClassifier, get_classifier
from ldm.eval.folder_classes import run_on_folder
from ldm.eval.heldout import held_out
from ldm.eval.measures import class_accuracy, fid
from ldm.eval.sampled import (
    add_sampling_arguments,
    check_counts,
    folder_nodes,
    generate,
    load_pipeline,
    parse_samplers,
    save_grid,
)
from ldm.eval.shapes_reader import adherence
from ldm.io.runs import run_config

DEFAULT_N = 128
DEFAULT_SAMPLER = "ddim:50"
PERCENT = 100.0
# --quick: a classifier trained on fewer images (seconds on a CPU); its numbers are for smoke tests only.
QUICK_CLASSIFIER = {"n_train": 3000, "epochs": 6, "lr": 5e-3, "n_val": 500}


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --classifier-cache and --quick, shared by `classes` and `fid`."""
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"NAME:STEPS (default {DEFAULT_SAMPLER})")
    parser.add_argument("--classifier-cache", default=DEFAULT_CACHE_DIR,
                        help=f"folder of trained shapes classifiers (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--quick", action="store_true", help="a quickly trained classifier (smoke tests, not results)")


def classifier_for(args: argparse.Namespace, size: int) -> ShapesClassifier:
    """The shapes classifier at the run's image size (trained and cached on first use)."""
    return get_classifier(size, args.classifier_cache, **(QUICK_CLASSIFIER if args.quick else {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `classes` subcommand's options."""
    add_sampling_arguments(parser, DEFAULT_N, "class-conditional (or unconditional) stage-2 run")
    add_classifier_arguments(parser)
    parser.add_argument("--guide", metavar="RUN", help="a noise-aware classifier run for classifier guidance "
                        "(stages/train_classifier.py); the measuring classifier stays the held-out shapes one")
    parser.add_argument("--guide-scale", type=float, default=1.0, help="its classifier-guidance scale (default 1)")


def run(args: argparse.Namespace) -> dict:
    """One row: class accuracy, reader adherence and feature FID of the run's samples."""
    check_counts(args)
    (sampler, steps), = parse_samplers(args.sampler)
    pipe = load_pipeline(args.run, "label", args.device)
    guide_scale = 0.0
    if args.guide:
        pipe.with_classifier(args.guide)
        guide_scale = args.guide_scale
    extra = {"classifier_scale": guide_scale} if guide_scale else {}
    nodes = folder_nodes(run_config(pipe.source["run"]))
    if nodes is not None:
        return run_on_folder(args, pipe, nodes, **extra)
    size = int(pipe.image_size)
    held = held_out(args.n, size)
    result = generate(pipe, held.labels, sampler, steps, args.scale, args.seed, args.batch_size, **extra)
    classifier = classifier_for(args, size)
    save_grid(result.images, args.grid)
    return {"command": "classes", "run": Path(pipe.source["run"]).name, "data": "shapes (held-out val items)",
            "sampler": sampler, "steps": steps, "nfe": result.nfe, "scale": args.scale,
            "classifier_scale": guide_scale, "n": len(held.labels),
            "class_accuracy_pct": PERCENT * class_accuracy(result.images, held.labels, classifier)["class_accuracy"],
            "reader_adherence_pct": PERCENT * adherence(result.images, held.factors)["all"],
            "fid": fid(result.images, held.images, classifier)}


def note(row: dict) -> str | None:
    """Says what the classes were measured on, and how good the reader is on a folder."""
    if str(row.get("data", "")).startswith("folder"):
        return (f"measured on the {row['data']}: the reader is a {row['reader']} images, where it reads "
                f"{row['reader_heldout_accuracy_pct']:.1f} % right")
    return "measured on the shapes data: the shapes classifier and the analytic reader"


def summary(row: dict) -> list[tuple[str, str, object]]:
    """(setting, measure, value) triples for the gathered table of `evaluate.py all`."""
    guided = f", classifier scale {row['classifier_scale']:g}" if row.get("classifier_scale") else ""
    setting = f"{row['sampler']} {row['steps']} steps, scale {row['scale']:g}{guided}, n={row['n']}"
    return [(setting, "class accuracy %", row["class_accuracy_pct"]),
            (setting, "reader adherence %", row["reader_adherence_pct"]) if "reader_adherence_pct" in row else
            (setting, "reader's held-out accuracy %", row["reader_heldout_accuracy_pct"]),
            (setting, "feature FID", row["fid"])]
