"""The training stages' command line, parsed before torch or Lightning load (``--help`` answers at once).

``python stages/<stage>.py [--cfg FILE] [--resume RUN] [--data DIR] [--threads N] [--dry-run] [key=value …]``;
``--data DIR`` points the recipe at a folder of images (``ldm.training.presets``), ``--dry-run`` prints the stage's
plan (``ldm.training.plan``) and exits without training or writing anything.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ldm.core.cli import add_threads_argument, script_parser

# Each stage's runs folder name → its default config (``ldm.training.stages`` adds the hooks).
DEFAULT_CONFIGS = {
    "vae": "configs/vae/shapes-kl-f4.yaml",
    "ldm": "configs/ldm/shapes-text.yaml",
    "controlnet": "configs/controlnet/shapes-canny.yaml",
    "classifier": "configs/classifier/shapes-latent.yaml",
    "reflow": "configs/ldm/shapes-text-reflow.yaml",
}


def build_parser(default_config: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line every stage script shares; ``description`` is the script's docstring."""
    parser = script_parser(description or __doc__)
    parser.add_argument("--cfg", help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", metavar="RUN", help="run directory, <stage>/latest or a .ckpt to continue from")
    parser.add_argument("--name", help="run name (default: the config's `name`)")
    parser.add_argument("--runs-dir", help="folder for run directories (default: runs, or $LDM_RUNS_DIR)")
    parser.add_argument("--data", metavar="DIR", help="train on the images in DIR instead of the config's data "
                        "(same as data.root=DIR); the caption mode is detected and reported")
    parser.add_argument("--captions", metavar="MODE", help="with --data: auto (default), metadata, txt, subfolders "
                        "or none (same as data.captions=MODE)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (config, the runs and files it uses, "
                        "what it derives, builds and writes) and exit without training or writing")
    add_threads_argument(parser, from_config=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=500")
    return parser


def parse_args(argv: Sequence[str] | None, default_config: str, description: str | None = None) -> argparse.Namespace:
    """Parse a stage's command line (overrides may come before or after options)."""
    return build_parser(default_config, description).parse_intermixed_args(argv)


def parse_stage_args(stage: str, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """A stage script's arguments: its own description, its stage's default config."""
    return parse_args(argv, DEFAULT_CONFIGS[stage], description)
