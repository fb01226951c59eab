"""`evaluate.py classes` on a run trained on a folder of class sub-folders.

A classifier is trained on the run's own real training images (``ldm.eval.folder_classifier``) and its accuracy on
the run's held-out images is reported beside the samples' accuracy (how far the reader itself can be trusted).
Samples are drawn for every class in turn; the feature FID compares them with the held-out real images in the
classifier's feature space.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.core.config import instantiate_from_config
from ldm.eval.classifier import features, predict
from ldm.eval.fid import frechet_distance
from ldm.eval.folder_classifier import get_folder_classifier, stack
from ldm.eval.report import EvalError
from ldm.eval.sampled import generate, parse_samplers, save_grid
from ldm.inference.pipeline import Pipeline

PERCENT = 100.0
MIN_FID_IMAGES = 2


def run_on_folder(args: argparse.Namespace, pipe: Pipeline, nodes: dict, classifier_scale: float = 0.0) -> dict:
    """One row: the samples' class accuracy, the reader's held-out accuracy and the feature FID, on a folder."""
    try:
        train = instantiate_from_config(nodes["train"], "cache.data.train")
        val = instantiate_from_config(nodes["val"], "cache.data.val") if "val" in nodes else None
    except (ValueError, OSError) as e:
        raise EvalError(f"cannot read the run's images again ({e}); the class folder must still be there") from e
    n_classes = int(pipe.n_classes or train.num_classes)
    if train.num_classes != n_classes:
        raise EvalError(f"the run has {n_classes} classes but {train.root} now has {train.num_classes} class folders")
    classifier = get_folder_classifier(train, n_classes, args.classifier_cache)
    real, real_labels = stack(val if val is not None and len(val) else train)
    heldout = (predict(classifier, real) == real_labels).float().mean().item()
    reference = real if len(real) >= MIN_FID_IMAGES else stack(train)[0]  # a covariance needs two images
    (sampler, steps), = parse_samplers(args.sampler)
    labels = [i % n_classes for i in range(args.n)]
    extra = {"classifier_scale": classifier_scale} if classifier_scale else {}
    result = generate(pipe, labels, sampler, steps, args.scale, args.seed, args.batch_size, **extra)
    save_grid(result.images, args.grid)
    accuracy = (predict(classifier, result.images) == torch.tensor(labels)).float().mean().item()
    distance = frechet_distance(features(classifier, result.images), features(classifier, reference))
    return {"command": "classes", "run": Path(pipe.source["run"]).name, "data": f"folder {nodes['train']['params']['root']}",
            "sampler": sampler, "steps": steps, "nfe": result.nfe, "scale": args.scale,
            "classifier_scale": classifier_scale, "n": len(labels),
            "class_accuracy_pct": PERCENT * accuracy, "reader_heldout_accuracy_pct": PERCENT * heldout,
            "reader": f"CNN trained on the run's {len(train)} training images, checked on {len(real)} held-out",
            "fid": distance}
