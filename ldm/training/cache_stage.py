"""Stage 1½ from the command line (``stages/cache_latents.py``): a stage-2 config's ``cache:`` section, planned
(``--dry-run`` prints it) and then encoded."""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.core.config import load_config
from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import apply_threads, resolve_threads
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.plan import describe
from ldm.training.presets import apply_folder, take_folder_overrides
from ldm.training.resolve import resolve_cache

log = logging.getLogger(__name__)
EXIT_BAD_INPUT = 2


def cache_config(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The config whose ``cache:`` section to build (``--vae``, ``--out``, ``--data`` applied) and what --data chose."""
    overrides, folder = take_folder_overrides(list(args.overrides), args.data, args.captions)
    overrides += [f"cache.vae={args.vae}"] if args.vae else []
    cfg = load_config(args.cfg, overrides)
    notes = apply_folder(cfg, folder) if folder is not None else []
    cfg["cache"]["dir"] = args.out or cfg["cache"]["dir"]
    return cfg, notes


def run(args: argparse.Namespace) -> dict | None:
    """Plan the cache; print the plan (``--dry-run``) or encode; returns the cache's meta (None after a dry run)."""
    setup_cli_logging()
    try:
        resolve_threads(args.threads)  # a bad --threads is refused before anything is read
        cfg, notes = cache_config(args)
        plan = resolve_cache(cfg, own_folder=not args.out)
        if args.dry_run:
            print(describe(f"latent cache from {args.cfg}", plan, notes))
            return None
        for line in notes:
            print(line)
        apply_threads(args.threads)
        meta = make_cache(plan.config) if args.out else ensure_cache(plan.config)  # changed sources: a folder of their own
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(f"cache: {plan.config['cache']['dir']}  items: {meta['count']}  latent: {meta['latent_shape']}  "
          f"scale_factor: {meta['scale_factor']:.5f}")
    sys.stdout.flush()
    return meta
